"""``bench/bench_train.py --smoke``: the GPU benchmark's code runs on the CPU at tiny shapes and
prints one JSON object per backend x precision with the agreed keys."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.tiny import ROOT

KEYS = {"anchor_tokens_per_s", "emu2_text_tokens_per_s", "emu2_images_tokens_per_s",
        "ratio_text_vs_anchor", "ratio_images_vs_anchor", "mfu", "backend", "precision"}


def test_bench_train_smoke_json(train_data, tmp_path):
    paths, tok = train_data
    proc = subprocess.run([sys.executable, "bench/bench_train.py", "--smoke", "--json", "--steps", "2",
                           "--backends", "unfused,sdpa", "--workdir", str(tmp_path), "--data", *paths,
                           "--tokenizer", str(tok)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["backend"], r["precision"]) for r in runs] == [("unfused", "fp32"), ("sdpa", "fp32")]
    for r in runs:
        assert KEYS <= set(r)
        assert r["anchor_tokens_per_s"] > 0 and r["emu2_text_tokens_per_s"] > 0
        for run in ("emu2_text", "emu2_images"):
            split = r[run]["time_s"]
            assert all(v >= 0 for v in split.values()) and split["data_wait"] <= r[run]["step_time_s"]
            assert r[run]["planner_gib"] > 0
        assert r["emu2_text"]["images_per_step"] == 0 and r["emu2_images"]["images_per_step"] > 0
        assert r["emu2_images"]["vit_share_flops"] > 0 and r["mfu"] is None  # no peak on a CPU
