"""``fakescope export``: a run as an ONNX model (normalisation and calibration inside, output p_ai)."""

from __future__ import annotations

from fakescope.commands import args as a


def add_parser(sub):
    p = sub.add_parser("export", help="export a run to ONNX (input [N,3,S,S] in [0,1], output p_ai)")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", default=None, help="output file (default RUN/model.onnx)")
    p.add_argument("--opset", type=a.positive_int, default=17)
    p.add_argument("--uncalibrated", action="store_true", help="export the raw p_ai even when the run is calibrated")
    p.add_argument("--threshold", type=a.threshold, default=None,
                   help="threshold stored in the metadata (default: the run's calibrated one, else 0.5)")
    return p


def run(args) -> int:
    from fakescope.export import export_onnx

    res = export_onnx(args.run, args.out, opset=args.opset, uncalibrated=args.uncalibrated, threshold=args.threshold)
    m = res["metadata"]
    print(f"{res['path']}: {m['model']}, input [N, 3, {m['input_size']}, {m['input_size']}] in [0, 1], output p_ai "
          f"({'calibrated, T = ' + m['calibration_temperature'] if m['p_ai_calibrated'] == 'true' else 'raw'}); "
          f"threshold {m['threshold']} ({m['threshold_source']}); opset {res['opset']}")
    return 0
