"""No operator that needs the host to know a device value runs in a training step: no
``nonzero``, no boolean-mask indexing, no ``.item()`` (``_local_scalar_dense``), from the first
forward through backward, gradient norm and clipping. Recorded with a torch dispatch mode at
TP1 and at TP2 x PP2 with sequence parallelism (the payload path), with images."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.dist import run_ranks
from tests.helpers.tiny import make_microbatches, tiny_config

pytestmark = pytest.mark.distributed

_SYNCING = {"nonzero", "nonzero_numpy", "masked_select", "_local_scalar_dense", "item", "is_nonzero",
            "unique", "_unique2", "masked_scatter", "repeat_interleave"}


def _in_rng_tracker() -> bool:
    import traceback

    return any(f.filename.endswith("tensor_parallel/random.py") and f.name == "fork"
               for f in traceback.extract_stack())


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense" and _in_rng_tracker():
            pass  # megatron-core's RNG tracker compares *CPU* RNG states on exit: no device sync
        elif name in _SYNCING:
            self.found.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ()):
                self.found.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


def _step(rank: int, tp: int, pp: int, backend: str, video_frames: int = 0) -> list[str]:
    from megatron_emu.parallel.groups import init_distributed
    from megatron_emu.parallel.sizes import ParallelSizes
    from megatron_emu.training import build
    from megatron_emu.training.grad_norm import clip_grads_, global_grad_norm
    from megatron_emu.training.optimizer import build_optimizer
    from megatron_emu.training.schedule import forward_backward, wrap_ddp

    cfg = tiny_config(tp=tp, pp=pp, sp=tp > 1, extra=(f"model.attention_backend={backend}",))
    init_distributed()
    pgs = build.process_groups(cfg)
    model = wrap_ddp(build.ddp_spec(cfg), build.model_chunks(cfg, pgs), pgs)
    optimizer, _ = build_optimizer(build.optimizer_spec(cfg), model, pgs)
    step = build.step_spec(cfg, ParallelSizes.from_groups(pgs))
    batches = make_microbatches(cfg, video_frames=video_frames, regress_video=bool(video_frames))
    assert sum(b.num_images for b in batches) > 0
    recorder = _Recorder()
    with recorder:
        forward_backward(step, model, batches, torch.device("cpu"), torch.float32)
        optimizer.prepare_grads()
        clip_grads_(optimizer, 0.1, global_grad_norm(optimizer, torch.device("cpu")))
    return recorder.found


@pytest.mark.parametrize("tp,pp,backend", [(1, 1, "sdpa"), (2, 2, "sdpa"), (1, 1, "unfused")])
def test_training_step_has_no_host_syncing_operator(tp, pp, backend):
    for found in run_ranks(tp * pp, _step, tp, pp, backend):
        assert found == [], f"operators that synchronise with the host: {sorted(set(found))}"


def test_training_step_with_video_has_no_host_syncing_operator():
    """Frames at the [gIMG] slots and their regression targets through the pipeline payload."""
    for found in run_ranks(4, _step, 2, 2, "sdpa", 2):
        assert found == [], f"operators that synchronise with the host: {sorted(set(found))}"


def test_the_recorder_sees_a_syncing_operator():
    recorder = _Recorder()
    with recorder:
        x = torch.tensor([0.0, 1.0, 2.0])
        x[x > 0] = 3.0
        (x > 1).nonzero()
        x.sum().item()
    assert {"nonzero", "_local_scalar_dense"} <= set(recorder.found)
    assert any("boolean mask" in f for f in recorder.found)
