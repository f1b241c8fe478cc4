"""``fakescope models``: the model registry, and whether a model's pretrained weights can be had here."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--check", metavar="NAME", default=None,
                   help="build NAME with its pretrained weights and say whether they can be had here")
    p.add_argument("--pretrained-file", default=None, help="with --check: local weights to try")
    p.add_argument("--autoencoders", action="store_true",
                   help="list the autoencoders of fakescope data align instead (factor, latent channels, input range)")
    return p


def _autoencoders() -> int:
    from fakescope.models.autoencoders import list_autoencoders

    for name, s in list_autoencoders().items():
        lo, hi = s.input_range
        sub = f"/{s.hub_subfolder}" if s.hub_subfolder else ""
        print(f"{name:10s} /{s.factor}, {s.latent_channels:2d} latent channels, input [{lo:g}, {hi:g}], "
              f"hub {s.hub_repo}{sub}: {s.description}")
    return 0


def run(args) -> int:
    if args.autoencoders:
        return _autoencoders()
    from fakescope.models import create_model, list_models

    if args.check:
        opts = {"pretrained_file": args.pretrained_file} if args.pretrained_file else {}
        m = create_model(args.check, **opts)
        weights = "pretrained weights available" if m.pretrained_weights else "trained from scratch (no weights needed)"
        print(f"{args.check}: {weights}; input {m.preprocess.input_size}px, "
              f"mean {m.preprocess.mean}, std {m.preprocess.std}, test geometry {m.test_geometry}, "
              f"{sum(p.numel() for p in m.parameters()):,} parameters")
        return 0
    models = list_models()
    for name, desc in models.items():
        if name != "timm":
            print(f"{name:16s} {desc}")
    print(f"{'timm:<name>':16s} {models['timm'].split(': ', 1)[-1]}")
    return 0
