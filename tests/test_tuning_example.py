"""examples/tuning_cpu.sh end to end (docs/tuning.md): sample conversations, videos and Gen
samples preprocessed with a chat tokenizer; Gen tuning (last-image regression), then Chat tuning
from its checkpoint (answers only, vocabulary grown to 32274), then ``megatron-emu-generate
--chat`` on the result."""

from __future__ import annotations

import json
import os
import subprocess
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
