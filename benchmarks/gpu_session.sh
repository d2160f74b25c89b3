#!/usr/bin/env bash
# Every GPU check of this project, for a GPU machine held for a short time: the smoke check
# (cut off at 270 s), then the throughput benchmark with compiled steps (cut off at 330 s; it
# prints what matters most first). Their output goes to the terminal and to OUT_DIR (default
# $OUT, else /tmp/gpu-session); fill benchmarks/RESULTS.md's GPU table from it.
#
#   bash benchmarks/gpu_session.sh [smoke|bench|all] [OUT_DIR]   # on the GPU machine, default all
#   bash benchmarks/gpu_session.sh --rehearse [OUT_DIR]          # the whole chain on a CPU, small
#
# Where one command may run 10 minutes at most, run `smoke` and `bench` as two commands (each
# under 6 minutes) on the machine while it is still held.
# On a machine without a package index: python benchmarks/gpu_wheels.py first, where pip
# works, and carry the .whl/ folder it fills; this script installs it (--no-index --target).
set -uo pipefail
cd "$(dirname "$0")/.."
rehearse=false
part=all
case "${1:-}" in
    --rehearse) rehearse=true; shift ;;
    smoke|bench|all) part=$1; shift ;;
esac
out=${1:-${OUT:-/tmp/gpu-session}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import torch, mlflow, optuna, fractal_mlops.config.sections, fractal_mlops.tracking.tracker
print('torch', torch.__version__, '| mlflow', mlflow.__version__, '| optuna', optuna.__version__,
      '| CUDA', torch.cuda.is_available())" 2>&1 | tee "$out/versions.txt" || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi | tee "$out/nvidia-smi.txt"

if $rehearse; then
    smoke=(--device cpu --images 400 --workers 1)
    bench=(--device cpu --steps 3 --largest 2x2 --workers 1 --compile)
else
    smoke=()
    # compiling b5-c7 takes minutes (506 s on a 2-core CPU): timed only when asked for
    bench=(--steps 200 --seconds 10 --compile small,middle)
fi
smoke_rc=0
bench_rc=0
if [ "$part" != bench ]; then
    timeout 270 "$python" benchmarks/gpu_smoke.py "${smoke[@]}" 2>&1 | tee "$out/gpu_smoke.log"
    smoke_rc=${PIPESTATUS[0]}
fi
if [ "$part" != smoke ]; then
    timeout 330 "$python" benchmarks/bench_gpu.py "${bench[@]}" 2>&1 | tee "$out/bench_gpu.log"
    bench_rc=${PIPESTATUS[0]}
fi
echo "gpu_smoke exit $smoke_rc, bench_gpu exit $bench_rc (124: cut off at its time limit)"
[ "$smoke_rc" = 0 ] && [ "$bench_rc" = 0 ]
