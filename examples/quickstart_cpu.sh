#!/usr/bin/env bash
# The main job on CPU: build a tiny real dataset (photos shipped in scikit-image / scikit-learn /
# matplotlib, with captions) and a tiny tokenizer with data_tools, then pretrain the tiny Emu2
# (ViT + adapter + LLaMA decoder, LM + regression heads) on 4 CPU processes with tensor
# parallelism 2 x pipeline parallelism 2. The first run stops at step 20 saving a checkpoint (as
# a preempted job would); the same command then resumes from `latest` and finishes step 40.
#
# Everything goes under ${WORKDIR:-./quickstart}: raw/ tokenizer/ data/ run/ checkpoints/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORKDIR="${WORKDIR:-./quickstart}"
STEPS="${STEPS:-40}"
export OMP_NUM_THREADS=1 PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"

echo "== 1/4 sample data: real photos + captions in every input format -> $WORKDIR/raw"
megatron-emu-data samples --out "$WORKDIR/raw" --copies 2

echo "== 2/4 tokenizer: SentencePiece trained on the captions + the Emu2 special tokens -> $WORKDIR/tokenizer"
megatron-emu-data tokenizer --train "$WORKDIR/raw/corpus.txt" --vocab-size 800 --out "$WORKDIR/tokenizer"

echo "== 3/4 preprocess: image-text pairs (img2dataset tars) and interleaved documents (MMC4) -> $WORKDIR/data"
megatron-emu-data preprocess --format img2dataset --input "$WORKDIR/raw/img2dataset" \
    --tokenizer "$WORKDIR/tokenizer" --out "$WORKDIR/data/pairs" --image-size 56 --workers 2 --no-progress >/dev/null
megatron-emu-data preprocess --format mmc4 --input "$WORKDIR/raw/mmc4/docs.jsonl" --images "$WORKDIR/raw/mmc4/images" \
    --tokenizer "$WORKDIR/tokenizer" --out "$WORKDIR/data/mmc4" --image-size 56 --workers 2 --no-progress >/dev/null
megatron-emu-data inspect "$WORKDIR/data/mmc4" --show 1

# megatron_emu.launch = torchrun (same options) that turns SIGTERM / SIGUSR1 into a checkpoint and exit 0.
TRAIN=(python -m megatron_emu.launch --standalone --nproc-per-node 4 -m megatron_emu.train
       --config "$ROOT/examples/configs/emu2_tiny.yaml"
       --set "data.path=['3:$WORKDIR/data/pairs', '1:$WORKDIR/data/mmc4']"
       --set "data.tokenizer=$WORKDIR/tokenizer"
       --set "run.dir=$WORKDIR/run" --set "checkpoint.dir=$WORKDIR/checkpoints"
       --set "train.train_iters=$STEPS" --set "train.exit_interval=$((STEPS / 2))")

echo "== 4/4 train: tiny Emu2, TP=2 x PP=2 on 4 CPU processes; stops at step $((STEPS / 2)) with a checkpoint"
"${TRAIN[@]}"
echo "== resume: the same command continues from $(cat "$WORKDIR/checkpoints/latest")"
"${TRAIN[@]}"

python - "$WORKDIR" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
m = [json.loads(l) for l in (w / "run" / "metrics.jsonl").read_text().splitlines()]
head, tail = m[:5], m[-5:]
avg = lambda rows, k: sum(r[k] for r in rows) / len(rows)
print(f"\nsteps {m[0]['step']}..{m[-1]['step']}:")
for k in ("lm_loss", "reg_loss"):
    print(f"  {k:8s} {avg(head, k):.3f} (first 5 steps) -> {avg(tail, k):.3f} (last 5 steps)")
print(f"checkpoint:  {w / 'checkpoints' / (w / 'checkpoints' / 'latest').read_text().strip()}")
print(f"metrics:     {w / 'run' / 'metrics.jsonl'}")
print(f"tensorboard: tensorboard --logdir {w / 'run' / 'tensorboard'}")
PY
