"""The CPU compatibility layer stays out of the way of code that is not megatron-core: torch's
device contexts still place tensors, and transformers builds models correctly in-process."""

from __future__ import annotations

import torch

import megatron_emu.compat  # noqa: F401  (activates the layer on CPU)


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
