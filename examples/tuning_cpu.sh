#!/usr/bin/env bash
# Fine-tuning on CPU (docs/tuning.md): from the sample data of `megatron-emu-data samples`, build
# a chat tokenizer ([USER] / [ASSISTANT], 32274 ids), preprocess conversations about the photos
# and clips (--format llava), WebVid-style video-text pairs (--format webvid) and Emu2-Gen samples
# (--format gen: grounded generation and editing), then
#   1. Gen tuning: the tiny Emu2 on the Gen samples, regressing only each sample's last image,
#      the ViT frozen;
#   2. Chat tuning: initialised from 1., on conversations and videos, cross-entropy on the
#      answers only, no regression (the vocabulary grows to 32274: same padded rows);
#   3. megatron-emu-generate --chat: a question about a photo in the chat template.
# One CPU process each (TP=1, PP=1), a few steps. Everything goes under ${WORKDIR:-./tuning}.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORKDIR="${WORKDIR:-./tuning}"
STEPS="${STEPS:-4}"
export OMP_NUM_THREADS=1 PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
RAW="$WORKDIR/raw"

echo "== 1/5 sample data: photos, clips, conversations and Gen samples -> $RAW"
megatron-emu-data samples --out "$RAW"

echo "== 2/5 chat tokenizer: SentencePiece on the sample text + Emu2 special tokens + [USER] [ASSISTANT]"
megatron-emu-data tokenizer --train "$RAW/corpus.txt" --vocab-size 800 --chat --out "$WORKDIR/tokenizer"

echo "== 3/5 preprocess: conversations (llava), video-text pairs (webvid), Gen samples (gen) -> $WORKDIR/data"
PRE=(megatron-emu-data preprocess --tokenizer "$WORKDIR/tokenizer" --image-size 56 --video-frames 2
     --workers 1 --no-progress)
"${PRE[@]}" --format llava --input "$RAW/chat/conversations.json" --images "$RAW/chat" \
    --system-message short --out "$WORKDIR/data/chat" >/dev/null
"${PRE[@]}" --format webvid --input "$RAW/webvid/results.csv" --images "$RAW/webvid/videos" \
    --out "$WORKDIR/data/video" >/dev/null
"${PRE[@]}" --format gen --input "$RAW/gen/gen.jsonl" --images "$RAW/gen" --out "$WORKDIR/data/gen" >/dev/null
megatron-emu-data inspect "$WORKDIR/data/chat" --show 1

TRAIN=(python -m megatron_emu.launch --standalone --nproc-per-node 1 -m megatron_emu.train
       --config "$ROOT/examples/configs/emu2_tiny.yaml"
       --set parallel.tensor_model_parallel_size=1 --set parallel.pipeline_model_parallel_size=1
       --set parallel.sequence_parallel=false --set "data.tokenizer=$WORKDIR/tokenizer"
       --set data.video_frames=2 --set data.num_workers=0 --set train.seq_length=160
       --set train.global_batch_size=2 --set "train.train_iters=$STEPS" --set "train.freeze=['vision.*']")

echo "== 4/5 Gen tuning: last-image regression, ViT frozen -> $WORKDIR/gen"
"${TRAIN[@]}" --set "data.path=$WORKDIR/data/gen" --set train.regression=last_image \
    --set "run.dir=$WORKDIR/gen/run" --set "checkpoint.dir=$WORKDIR/gen/checkpoints"

echo "== 5/5 Chat tuning from the Gen checkpoint: answers only, no regression -> $WORKDIR/chat"
"${TRAIN[@]}" --set "data.path=['3:$WORKDIR/data/chat', '1:$WORKDIR/data/video']" \
    --set model.lm.vocab_size=32274 --set model.model_version=chat --set train.regression=none \
    --set model.loss.reg_weight=0.0 --set "checkpoint.load=$WORKDIR/gen/checkpoints" \
    --set "run.dir=$WORKDIR/chat/run" --set "checkpoint.dir=$WORKDIR/chat/checkpoints"

echo "== chat: a question about a photo, in the chat template"
megatron-emu-generate --ckpt "$WORKDIR/chat/checkpoints" --chat --prompt "<image> What is shown in this picture?" \
    --image "$RAW/chat/images/chelsea_0.jpg" --max-new-tokens 8 --greedy --json
