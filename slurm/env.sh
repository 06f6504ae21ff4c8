# Site settings for the megatron_emu batch scripts: the ONLY file to edit for a cluster.
# Sourced by pretrain.sbatch, preprocess.sbatch and convert.sbatch; every value
# can also come from the environment of `sbatch` (--export) and is kept then.

# Software: modules, a virtual environment or a container.
# module load cuda/12.8 nccl                               # e.g. Lmod modules
# source /shared/venvs/megatron_emu/bin/activate           # e.g. a virtual environment
: "${PYTHON:=python3}"
# Container (pyxis/enroot): extra srun arguments for every step, e.g.
#   SRUN_CONTAINER_ARGS="--container-image=/shared/images/megatron_emu.sqsh --container-mounts=/data:/data"
: "${SRUN_CONTAINER_ARGS:=}"

# Resources. pretrain.sbatch and convert.sbatch ask for whole nodes (#SBATCH --exclusive --mem=0:
# every CPU and all the memory of a node; pretrain.sbatch gives them to its one launcher per node,
# which runs the ranks and their DataLoader workers). That is what GPU training expects and it
# works on any node size. Where nodes are shared between jobs, ask on the command line instead
# (it overrides the #SBATCH lines): sbatch --oversubscribe --cpus-per-task=32 --mem=400G ...
# Partition, account or QOS for every submission: SLURM's own variables in the submitting shell,
# e.g. export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproject (they override #SBATCH lines too).

# Processes per node: one per GPU by default; set NPROC_PER_NODE=2 (and sbatch --gpus-per-node=0)
# to run on CPU nodes with gloo.
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi

# Threads per rank (CPU ops, data workers set their own).
: "${OMP_NUM_THREADS:=1}"

# NCCL / CUDA for H100 + InfiniBand (harmless on CPU nodes).
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"      # megatron-core: TP/SP communication overlap ordering
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"  # a failed collective aborts instead of hanging
: "${NCCL_DEBUG:=WARN}"
# : "${NCCL_IB_HCA:=mlx5}"  : "${NCCL_SOCKET_IFNAME:=ib0}"   # site network names
export PYTHON SRUN_CONTAINER_ARGS NPROC_PER_NODE OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS \
       TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG

# Seconds between the pre-timeout signal and the time limit is set in pretrain.sbatch
# (#SBATCH --signal=USR1@300); raise it if saving a checkpoint takes longer.
