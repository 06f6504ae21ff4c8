"""transformers as an independent oracle, run in a fresh interpreter.

The CPU compatibility layer for megatron-core (on for the whole test session, as in every CPU
entry point) wraps torch's factory functions process-wide;
transformers 5 initialises non-persistent buffers (LLaMA's RoPE ``inv_freq``) through a meta-
device path that those wrappers disturb. So the oracle never shares a process with
megatron_emu: it runs here in a subprocess and returns plain tensors.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_SCRIPT = r'''
import sys, torch
from transformers import AutoModelForCausalLM
path, tokens, steps, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([tokens])).logits[0]
    gen = model.generate(torch.tensor([tokens[:4]]), max_new_tokens=steps, do_sample=False,
                         eos_token_id=2, pad_token_id=32000)[0, 4:]
torch.save({"logits": logits, "greedy": gen}, out)
'''


def llama_logits_and_greedy(model_dir, tokens: list[int], steps: int) -> dict:
    """``{"logits": [s, vocab], "greedy": [new ids]}`` from ``AutoModelForCausalLM``
    (greedy decoding continues ``tokens[:4]``)."""
    assert "megatron_emu" not in _SCRIPT
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_dir), ",".join(map(str, tokens)),
                               str(steps), str(out)], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"transformers oracle failed:\n{proc.stderr[-3000:]}")
        result = torch.load(out, weights_only=True)
    return {"logits": result["logits"], "greedy": result["greedy"].tolist()}
