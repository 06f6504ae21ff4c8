#!/usr/bin/env bash
# One prepared GPU session: install the staged wheels, build the CUDA extension, run the GPU
# tests and every GPU benchmark, and write one report ($OUT/report.txt + one log per step).
#
# The GPU machine has no network and takes at most 64 MiB per call. Beforehand, on a CPU machine:
#   python bench/stage_wheels.py download            # megatron-core, TE (+ runtime deps), DALI
#   python bench/stage_wheels.py build-te            # transformer_engine_torch for torch 2.11+cu130
#   python bench/stage_wheels.py pack                # -> .whl/stage/send/g01 ... gNN (<= 60 MiB each)
# Then one device call per folder, each within 30 s of the last (the machine stays warm):
#   carry .whl/stage/send/gNN, command: mkdir -p /tmp/parts && cp -r .whl/stage/send/gNN /tmp/parts/
# and, in the call carrying the last folder, after the copy: bash bench/gpu_checks.sh
# (steps can be chosen: bash bench/gpu_checks.sh install build gpu_tests bench_train).
# Every step has its own time limit; a failing step does not stop the next. The script ends
# within DEADLINE seconds (default 540). Figures go to docs/benchmarks.md with device and date.
set -u
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
PARTS="${PARTS:-/tmp/parts}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
DEADLINE="${DEADLINE:-540}"
STEPS="${*:-install env build gpu_tests bench_train bench_fused bench_data}"
REPORT="$OUT/report.txt"
step() {  # step NAME SECONDS CMD...
  local name=$1 t=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$t" ] && t=$left
  [ "$t" -lt 20 ] && { echo "== $name: skipped (out of time)" | tee -a "$REPORT"; return 0; }
  local t0=$SECONDS
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  { echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-15}" "$OUT/$name.log"; } | tee -a "$REPORT"
}
: >"$REPORT"
install() {
  python3 bench/stage_wheels.py assemble --out /tmp/wheels "$PARTS"/g* &&
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheels/*.whl
}
step install 120 install
export PYTHONPATH="/tmp/site:$PWD"
step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc;
  python3 -c "import torch, megatron.core as m; print(torch.__version__, torch.version.cuda, m.__version__, torch.cuda.get_device_name())";
  python3 -c "import torch, transformer_engine.pytorch as te; print(\"TE\", te.__version__ if hasattr(te, \"__version__\") else \"ok\")";
  python3 -c "import nvidia.dali as d; print(\"DALI\", d.__version__)"'
step build 240 env TORCH_CUDA_ARCH_LIST=9.0 MEGATRON_EMU_BUILD_CUDA=1 MAX_JOBS=8 CXX=/usr/bin/g++ \
  python3 setup.py -q build_ext --inplace
TAIL=25 step gpu_tests 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/gpu tests/data/test_decode.py
# anchor vs Emu2 text vs Emu2 images, per backend (unfused, sdpa, te) and precision (bf16, fp8)
TAIL=60 step bench_train 300 python3 bench/bench_train.py --steps 10 --warmup 3 --workdir /tmp/bench_train
TAIL=30 step bench_fused 90 python3 bench/bench_fused_loss.py --device cuda --repeat 5
TAIL=30 step bench_data 120 python3 bench/bench_data.py --image-size 448 --copies 2
echo "report: $REPORT"
