"""The CPU compatibility layer is an explicit switch: importing megatron_emu changes nothing in
torch (or the warning filters) until ``enable_cpu()``, ``disable()`` restores every object, a
``torch.cuda`` name megatron-core reaches without a stand-in fails loudly, and the megatron-core
version is checked against the range the code was written for. With the layer on (the test
session enables it like every entry point), code that is not megatron-core keeps working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SNAPSHOT_AND_IMPORT = r'''
import importlib, logging, pkgutil, sys, warnings
import torch

FACTORIES = ["tensor", "zeros", "ones", "empty", "full", "arange", "randn", "zeros_like", "compile"]
METHODS = ["to", "type", "cuda", "pin_memory", "record_stream", "new_zeros", "new_tensor"]
CUDA = ["current_device", "synchronize", "set_device", "Stream", "Event", "get_rng_state",
        "set_rng_state", "manual_seed", "manual_seed_all", "current_stream", "empty_cache"]

def snapshot():
    return {
        "torch": {n: getattr(torch, n) for n in FACTORIES},
        "methods": {n: vars(torch.Tensor).get(n, "inherited") for n in METHODS},
        "cuda_module": torch.cuda,
        "cuda": {n: getattr(torch.cuda, n) for n in CUDA},
        "warning_filters": list(warnings.filters),
        "logging_filters": {n: list(logging.getLogger(n).filters) for n in (
            "megatron.core.transformer.transformer_layer", "megatron.core.tensor_parallel.random")},
    }

def diff(a, b):
    from megatron_emu.compat.notices import KNOWN

    ours = lambda filters: [f for f in filters if f[1] is not None and f[1].pattern in KNOWN]  # noqa: E731
    out = ["warning_filters"] if ours(a["warning_filters"]) != ours(b["warning_filters"]) else []
    for key in a:
        if key == "warning_filters":  # third-party libraries (urllib3, sympy) add theirs on import
            continue
        if isinstance(a[key], dict):
            out += [f"{key}.{n}" for n in a[key] if a[key][n] is not b[key].get(n) and a[key][n] != b[key].get(n)]
        elif a[key] is not b[key] and a[key] != b[key]:
            out.append(key)
    return out

before = snapshot()
import megatron_emu
for info in pkgutil.walk_packages(megatron_emu.__path__, "megatron_emu."):
    importlib.import_module(info.name)
import megatron.core.tensor_parallel.random, megatron.core.transformer.transformer_layer  # noqa
print("IMPORT", diff(before, snapshot()))
from megatron_emu import compat
compat.enable_cpu()
changed = diff(before, snapshot())
print("ENABLED", len(changed) > 0, "torch.zeros" in " ".join(changed) or "torch.zeros" in str(changed))
compat.disable()
print("DISABLED", diff(before, snapshot()))
'''


def test_import_leaves_torch_unchanged_until_enable_cpu_and_disable_restores_it():
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT_AND_IMPORT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()}
    assert lines["IMPORT"] == "[]", f"importing megatron_emu changed: {lines['IMPORT']}"
    assert lines["ENABLED"] == "True True"
    assert lines["DISABLED"] == "[]", f"disable() left changed: {lines['DISABLED']}"


def test_a_torch_cuda_name_megatron_reaches_without_a_stand_in_fails_naming_it():
    from megatron_emu.compat import CpuCompatError, is_enabled

    assert is_enabled()  # tests/conftest.py, as every entry point on a CPU
    as_megatron = {"__name__": "megatron.core.some_module", "torch": torch}
    with pytest.raises(CpuCompatError, match=r"torch\.cuda\.get_device_properties.*compat/cuda_standin\.py"):
        exec("torch.cuda.get_device_properties(0)", as_megatron)
    assert torch.cuda.current_device() == torch.device("cpu")  # a stand-in, for every caller
    assert callable(torch.cuda.get_device_properties)  # other callers: the real attribute
    assert torch.cuda.is_available() is False


def test_megatron_core_version_range():
    from megatron_emu.compat.version import SUPPORTED, TESTED, UnsupportedMegatronError, check_megatron_version

    for version in TESTED:
        assert check_megatron_version(version) == version
    for version in ("0.15.0", "0.20.0", "1.0", "not installed"):
        with pytest.raises(UnsupportedMegatronError, match=re.escape(f"{SUPPORTED[0]} to {SUPPORTED[1]}")):
            check_megatron_version(version)
    with pytest.warns(UserWarning, match="tested with"):
        check_megatron_version("0.18.0")


def test_setup_pins_a_tested_megatron_core_on_every_python():
    from megatron_emu.compat.version import TESTED

    pins = re.findall(r'"megatron-core([^;"]*); python_version ([^"]+)"', (ROOT / "setup.py").read_text())
    assert pins, "setup.py pins no megatron-core"
    for spec, marker in pins:
        assert spec.startswith("==") and spec[2:] in TESTED, (spec, marker)
    assert {m for _, m in pins} == {"< '3.12'", ">= '3.12'"}


def test_device_context_still_places_factories():
    with torch.device("meta"):
        tensors = [torch.empty(3), torch.zeros(2, 2), torch.randn(4), torch.ones(1).new_zeros(2),
                   torch.nn.Linear(4, 4).weight]
    assert all(t.is_meta for t in tensors)
    assert not torch.empty(1).is_meta


def test_transformers_loads_correctly_in_process(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path)  # meta-device init, then materialised
    head = cfg.hidden_size // cfg.num_attention_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    expected = 1.0 / (theta ** (torch.arange(0, head, 2).float() / head))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
