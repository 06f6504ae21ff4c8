"""examples/tuning_cpu.sh end to end (docs/tuning.md): sample conversations, videos and Gen
samples preprocessed with a chat tokenizer; Gen tuning (last-image regression), then Chat tuning
from its checkpoint (answers only, vocabulary grown to 32274), then ``megatron-emu-generate
--chat`` on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_emu.contracts import chat_template
from megatron_emu.data.tokenizer import Emu2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
BOS, IMG, END, IMAGE, USER, ASSISTANT = 1, 32001, 32002, 32003, 32272, 32273


def test_tuning_example_trains_gen_then_chat_and_answers_in_the_template(tmp_path):
    work = tmp_path / "tuning"
    proc = subprocess.run(["bash", str(ROOT / "examples" / "tuning_cpu.sh")], env={**os.environ, "WORKDIR": str(work)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summaries = {name: json.loads((work / "data" / name / "summary.json").read_text()) for name in ("chat", "gen")}
    assert summaries["chat"]["chat"] == summaries["chat"]["documents"] > 0 and summaries["chat"]["skipped"] == {}
    assert summaries["gen"]["grounded"] > 0 and summaries["gen"]["edit"] > 0

    def metrics(stage):
        return [json.loads(line) for line in (work / stage / "run" / "metrics.jsonl").read_text().splitlines()]
    gen, chat = metrics("gen"), metrics("chat")
    assert [r["step"] for r in gen] == [r["step"] for r in chat] == [1, 2, 3, 4]
    assert all(r["reg_loss"] > 0 for r in gen)  # the last images are regressed
    assert all(r["reg_loss"] == 0 and r["lm_loss"] > 0 for r in chat)  # answers only
    assert f"initialised weights from {work / 'gen' / 'checkpoints' / 'iter_0000004'}" in out

    answer = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"prompt_ids"')][-1])
    tok = Emu2Tokenizer(work / "tokenizer")
    e = tok.encode
    assert answer["prompt_ids"] == [BOS, *e(chat_template.SYSTEM_MESSAGES["short"]), USER, *e(":"),
                                    IMG, *[IMAGE] * 4, END, *e("What is shown in this picture?"), ASSISTANT, *e(":")]
    assert 0 < len(answer["output_ids"]) <= 8 and answer["text"] == tok.decode(answer["output_ids"])

    # a video in the chat template, laid out as in the conversations; a non-chat model is refused
    gen_ckpt, chat_ckpt = work / "gen" / "checkpoints", work / "chat" / "checkpoints"
    video = work / "raw" / "chat" / "videos" / "1000.mp4"
    run = [sys.executable, "-m", "megatron_emu.cli.generate", "--chat", "--prompt", "<video>\nWhat happens in this clip?",
           "--video", str(video), "--system-message", "none", "--max-new-tokens", "2", "--greedy", "--json", "--ckpt"]
    ok = subprocess.run([*run, str(chat_ckpt)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    frame = [IMG, *[32004] * 4, END]
    assert json.loads(ok.stdout.splitlines()[-1])["prompt_ids"] == [
        BOS, USER, *e(":"), 32007, *frame, *frame, *e("What happens in this clip?"), ASSISTANT, *e(":")]
    refused = subprocess.run([*run, str(gen_ckpt)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--chat needs a chat model and tokenizer" in refused.stderr
