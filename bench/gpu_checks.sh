#!/usr/bin/env bash
# One prepared GPU session: build the CUDA extension, run the GPU tests and the GPU benchmarks,
# and check the CPU suite against the newest megatron-core. Meant for a GPU machine with torch
# but no network: the missing wheels travel in .whl/, fetched beforehand with
#   W="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64"
#   pip download $W -d .whl/m16 megatron-core==0.16.1; pip download $W -d .whl/m19 megatron-core==0.19.2
#   pip download --no-deps -d .whl/common webdataset==1.0.2 braceexpand
# Each step has its own time limit and log under $OUT; a failing step does not stop the next.
# Figures from a run are in docs/benchmarks.md. Usage: bash bench/gpu_checks.sh [steps...]
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
DEADLINE="${DEADLINE:-480}"  # seconds for the whole script
STEPS="${*:-env build gpu_tests bench_fused mcore_new gpu_tests_new bench_train}"
step() {  # step NAME SECONDS CMD...
  local name=$1 t=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$t" ] && t=$left
  [ "$t" -lt 20 ] && { echo "== $name: skipped (out of time)"; return 0; }
  local t0=$SECONDS
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-15}" "$OUT/$name.log"
}
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" "${@:2}"; }
pipi /tmp/site16 .whl/m16/*.whl .whl/common/*.whl && pipi /tmp/site19 .whl/m19/*.whl .whl/common/*.whl || exit 3
export PYTHONPATH="/tmp/site16:$PWD"

step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
  python3 -c "import torch, megatron.core as m; print(torch.__version__, torch.version.cuda, m.__version__, torch.cuda.get_device_name())"; nproc'
step build 300 env TORCH_CUDA_ARCH_LIST=9.0 MEGATRON_EMU_BUILD_CUDA=1 MAX_JOBS=8 python3 setup.py -q build_ext --inplace
step gpu_tests 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu tests/data/test_decode.py
TAIL=30 step bench_fused 120 python3 bench/bench_fused_loss.py --device cuda --repeat 5
# The CPU/gloo suite (no SLURM) under the newest megatron-core, GPU hidden; then its GPU tests.
CUDA_VISIBLE_DEVICES= PYTHONPATH="/tmp/site19:$PWD" TAIL=12 step mcore_new 200 \
  python3 -m pytest -q -p no:cacheprovider -n 8 --ignore=tests/slurm --ignore=tests/test_quickstart.py tests
PYTHONPATH="/tmp/site19:$PWD" TAIL=6 step gpu_tests_new 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu
TAIL=8 step bench_train 240 python3 bench/bench_train.py --steps 12 --warmup 4 --workdir /tmp/bench_train
