#!/bin/bash
# Submit a chain of N dependent pretraining jobs (each starts when the previous one ended, for
# any reason, and resumes from `latest`); for week-long runs on clusters with a per-job time
# limit. The jobs are not requeued themselves: the chain takes over.
#
#   slurm/submit_chain.sh 10 [sbatch options ...] -- CONFIG.yaml [--set key=value ...]
#   slurm/submit_chain.sh 10 --nodes=32 --time=04:00:00 -- examples/configs/emu2_37b_stage2.yaml --set ...
set -euo pipefail
if [ $# -lt 3 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 N [sbatch options ...] -- CONFIG.yaml [--set key=value ...]" >&2; exit 2
fi
N=$1; shift
SBATCH_ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SBATCH_ARGS+=("$1"); shift; done
[ "${1:-}" = "--" ] || { echo "$0: missing -- before the config" >&2; exit 2; }
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
prev=""
for ((i = 1; i <= N; i++)); do
  dep=()
  [ -n "$prev" ] && dep=(--dependency="afterany:$prev")
  # Passed through sbatch's default --export=ALL (kept when the options add --export=ALL,...).
  prev=$(MEGATRON_EMU_REQUEUE=0 MEGATRON_EMU_ROOT="$ROOT" sbatch --parsable "${dep[@]}" --no-requeue \
         "${SBATCH_ARGS[@]}" "$ROOT/slurm/pretrain.sbatch" "$@")
  echo "chain job $i/$N: $prev${dep:+ (after ${dep[0]#--dependency=afterany:})}"
done
