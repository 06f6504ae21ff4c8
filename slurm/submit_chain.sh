#!/bin/bash
# Submit a chain of N dependent pretraining jobs for week-long runs on clusters with a per-job
# time limit: each job resumes from `latest` and starts only if the previous one succeeded
# (afterok): it finished, or it stopped with a checkpoint (the pre-timeout SIGUSR1, a SIGTERM
# that was not a cancel, train.exit_interval / exit_duration_mins) and exited 0. A failed,
# cancelled or timed-out job (the pre-timeout signal came too late to save: raise --signal's
# margin) cancels the rest of the chain. The last job fails loudly (FAILED) unless training
# reached train.train_iters. The jobs are not requeued themselves: the chain takes over.
#
#   slurm/submit_chain.sh 10 [sbatch options ...] -- CONFIG.yaml [--set key=value ...]
#   slurm/submit_chain.sh 10 --nodes=32 --time=04:00:00 -- examples/configs/emu2_37b_stage2.yaml --set ...
set -euo pipefail
if [ $# -lt 3 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
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
  [ -n "$prev" ] && dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
  last=0; [ "$i" -eq "$N" ] && last=1
  # Passed through sbatch's default --export=ALL (kept when the options add --export=ALL,...).
  prev=$(MEGATRON_EMU_REQUEUE=0 MEGATRON_EMU_CHAIN_LAST=$last MEGATRON_EMU_ROOT="$ROOT" \
         sbatch --parsable "${dep[@]}" --no-requeue "${SBATCH_ARGS[@]}" "$ROOT/slurm/pretrain.sbatch" "$@")
  prev=${prev%%;*}
  echo "chain job $i/$N: $prev${dep:+ (after ${dep[0]#--dependency=afterok:})}"
done
