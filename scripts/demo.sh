#!/usr/bin/env bash
# The main job on a fresh machine, without downloading anything (see `make demo`):
# a small built-in demo dataset (NOT GenImage), cnn32 and a frozen ImageNet backbone trained,
# evaluated and compared. Results land in $DEMO_DIR.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo-output}
FS=${FS:-.venv/bin/fakescope}
SHARED_WEIGHTS=${SHARED_WEIGHTS:-../shared/weights/tf_efficientnet_lite0_imagenet.safetensors}
mkdir -p "$DEMO_DIR"

echo "== 1. demo dataset (real photos shipped with scikit-learn/matplotlib vs. up-sampling networks; not GenImage)"
[ -d "$DEMO_DIR/data" ] || $FS data demo "$DEMO_DIR/data"
$FS data inspect "$DEMO_DIR/data"
$FS data show "$DEMO_DIR/data" --out "$DEMO_DIR/samples.png"

echo "== 2. which frozen ImageNet backbone can we honestly use?"
BACKBONE=()
if $FS models --check resnet50 >/dev/null 2>"$DEMO_DIR/resnet50-weights.txt"; then
  BACKBONE=(resnet50)
  echo "resnet50 ImageNet weights are available: using the study's frozen ResNet-50"
elif [ -f "$SHARED_WEIGHTS" ]; then
  cat "$DEMO_DIR/resnet50-weights.txt"
  echo "-> resnet50's ImageNet weights cannot be had here; using the local ImageNet weights of"
  echo "   tf_efficientnet_lite0 ($SHARED_WEIGHTS) as the frozen backbone instead"
  BACKBONE=("timm:tf_efficientnet_lite0" "$SHARED_WEIGHTS")
else
  cat "$DEMO_DIR/resnet50-weights.txt"
  echo "-> no pretrained ImageNet weights can be had on this machine: the frozen-backbone model is skipped"
  echo "   (a frozen random backbone would measure nothing). Provide weights with --pretrained-file."
fi

echo "== 3. benchmark: train on all generators, evaluate on val, report"
MODELS=cnn32
EXTRA=()
if [ ${#BACKBONE[@]} -ge 1 ]; then
  MODELS="cnn32,${BACKBONE[0]}"
  [ ${#BACKBONE[@]} -ge 2 ] && EXTRA=(--pretrained-file "${BACKBONE[1]}")
fi
$FS benchmark --data "$DEMO_DIR/data" --models "$MODELS" --epochs 8 --out "$DEMO_DIR/benchmark" \
  --degrade jpeg:90,50 --degrade blur:1 --jpeg-align 90 --cross "${EXTRA[@]}"

RUN=$(ls -d "$DEMO_DIR"/benchmark/runs/cnn32* | head -1)
echo "== 4. adversarial robustness of $RUN (PGD-Linf, 40 images per generator and class)"
$FS attack "$RUN" --data "$DEMO_DIR/data" --attack pgd --eps 0,1/255,2/255,4/255,8/255 --limit 40 \
  --out "$DEMO_DIR/attack"

echo "== 5. predict on a few files"
$FS predict "$RUN" "$DEMO_DIR/data/demo_upconv/val/ai/00000.png" "$DEMO_DIR/data/demo_upconv/val/nature/00000.png"

echo "== 6. serve it: fakescope serve on a free loopback port, one request, then stop"
PY=${PY:-.venv/bin/python}
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$FS serve "$RUN" --port "$PORT" --no-access-log >"$DEMO_DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
$PY - "$PORT" "$DEMO_DIR/data/demo_upconv/val/ai/00000.png" <<'PYEOF'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if urllib.request.urlopen(f"{url}/ready", timeout=1).status == 200:
            break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("the server never became ready (see serve.log)")
req = urllib.request.Request(f"{url}/v1/predict", data=open(sys.argv[2], "rb").read(),
                             headers={"Content-Type": "image/png"})
print(f"POST {url}/v1/predict ->", json.dumps(json.load(urllib.request.urlopen(req, timeout=60))))
PYEOF
kill $SERVER 2>/dev/null || true
wait $SERVER 2>/dev/null || true
trap - EXIT

echo
echo "Done. Results:"
echo "  $DEMO_DIR/benchmark/report.html   (open in a browser; also report.md, results.json)"
echo "  $DEMO_DIR/benchmark/runs/         (one run directory per model and seed)"
echo "  $DEMO_DIR/attack/                 (robust accuracy versus eps)"
echo "  $DEMO_DIR/samples.png             (sample grid)"
