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


_EMU2_SCRIPT = r'''
import sys, torch
from transformers import AutoModelForCausalLM
path, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3]
x = torch.load(inputs, weights_only=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=x["tokens"], image=x["images"]).logits
    gen = model.generate(x["tokens"][:, :x["prompt_len"]], image=x["images"], max_new_tokens=x["steps"],
                         do_sample=False, num_beams=1)
torch.save({"logits": logits, "greedy": gen[0], "class": type(model).__name__}, out)
'''


def emu2_logits_and_greedy(model_dir, tokens: torch.Tensor, images: torch.Tensor, prompt_len: int,
                           steps: int) -> dict:
    """Our exported Emu2 directory through ``AutoModelForCausalLM.from_pretrained(...,
    trust_remote_code=True)``, offline (``HF_HUB_OFFLINE=1``, dynamic modules in a temporary
    cache): ``{"logits": [b, s, vocab], "greedy": [new ids] after tokens[:, :prompt_len],
    "class": the class name}``."""
    import os

    assert "megatron_emu" not in _EMU2_SCRIPT
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"tokens": tokens, "images": images, "prompt_len": prompt_len, "steps": steps}, inputs)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_MODULES_CACHE": str(Path(tmp) / "modules"), "HF_HOME": str(Path(tmp) / "hf_home")}
        proc = subprocess.run([sys.executable, "-c", _EMU2_SCRIPT, str(model_dir), str(inputs), str(out)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
        if proc.returncode:
            raise RuntimeError(f"transformers oracle failed:\n{proc.stderr[-3000:]}")
        result = torch.load(out, weights_only=True)
    return {"logits": result["logits"], "greedy": result["greedy"].tolist(), "class": result["class"]}
