"""Peak memory and time of the heads' losses, naive vs fused, measured side by side in one run.

Regression head (``project_down`` + MSE): ``F.mse_loss(F.linear(h, W), target)`` vs
``megatron_emu.ops.fused_linear_mse`` (extension backend, and the pure-torch backend).
Text head: ``F.cross_entropy(F.linear(h, W_lm))`` vs megatron-core's fused vocab-parallel CE on
fp32 logits (the ``fused`` option, one rank) and torch's chunked ``F.linear_cross_entropy`` (the
``linear_chunked`` option at TP = 1; torch >= 2.13).

CPU (default): fp32, regression N=8192 H=1024 D=1792, text N=4096 H=1024 V=32272. Peak = the
maximum of the CPU allocator's running total (torch profiler memory events) during forward +
backward, above the inputs. GPU (``--device cuda``): bf16, H=6656, ``max_memory_allocated``.
Targets: regression peak <= 0.35x naive at <= 1.0x the time.

Usage: python bench/bench_fused_loss.py [--device cpu|cuda] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_emu.ops import fused_linear_mse, has_extension  # noqa: E402


def cpu_peak(fn) -> int:
    """Bytes: the peak of the running allocation total while ``fn`` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free in time order (the profiler's raw "[memory]" records).
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    total = peak = 0
    for e in records:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def best_time(fn, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name: str, make_loss, params, device: str, repeat: int) -> dict:
    """Forward + backward; the peak counts what one step allocates (gradients included) above
    the inputs, so the previous step's gradients are dropped before it starts."""
    def clear():
        for p in params:
            p.grad = None

    def step():
        loss = make_loss()
        loss.backward()
        del loss
    clear()
    step()  # warm-up
    clear()
    peak = (cuda_peak if device == "cuda" else cpu_peak)(step)
    times = []
    for _ in range(repeat):
        clear()
        times.append(best_time(step, 1, device))
    return {"name": name, "peak_mib": peak / 2**20, "time_ms": 1e3 * min(times)}


def regression(device: str, dtype, n: int, h: int, d: int, repeat: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(d, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    target = torch.randn(n, d, generator=g).to(device, dtype)
    rows = [measure("naive F.mse_loss(F.linear)", lambda: F.mse_loss(F.linear(hidden, weight), target),
                    (hidden, weight), device, repeat)]
    backends = ["torch"] + (["ext"] if has_extension(device) else [])
    for b in backends:
        rows.append(measure(f"fused_linear_mse ({b})", lambda b=b: fused_linear_mse(hidden, weight, target, backend=b),
                            (hidden, weight), device, repeat))
    return rows


def _one_rank_group(device: str):
    """A one-process group for megatron-core's vocab-parallel CE (its all-reduces are no-ops)."""
    import socket

    import torch.distributed as dist

    from megatron_emu.compat import setup_process

    setup_process(cpu=device != "cuda")  # megatron-core's CPU layer on the CPU
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{port}")
    return dist.group.WORLD


def text_head(device: str, dtype, n: int, h: int, v: int, repeat: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::7] = -100
    rows = [measure("naive F.cross_entropy(F.linear)",
                    lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100),
                    (hidden, weight), device, repeat)]
    group = _one_rank_group(device)
    from megatron_emu.model.fused_ce import fused_vocab_parallel_cross_entropy
    keep = (labels != -100).float()

    def megatron_fused():  # the model's ``lm_ce_impl: fused`` path at TP = 1 (fp32 logits)
        logits = F.linear(hidden, weight).float().unsqueeze(1)  # [N, 1, V]
        ce = fused_vocab_parallel_cross_entropy(logits, labels.clamp(min=0).unsqueeze(1), group)
        return (ce.squeeze(1) * keep).sum() / keep.sum()
    rows.append(measure("megatron fused vocab-parallel CE", megatron_fused, (hidden, weight), device, repeat))
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        rows.append(measure("F.linear_cross_entropy (chunked)", lambda: F.linear_cross_entropy(
            hidden, weight, labels, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions()),
            (hidden, weight), device, repeat))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: per-core figures)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        dtype, reg, txt = torch.bfloat16, (8192, 6656, 1792), (8192, 6656, 32272)
    else:
        dtype, reg, txt = torch.float32, (8192, 1024, 1792), (4096, 1024, 32272)
    out = {"device": args.device, "dtype": str(dtype), "extension": has_extension(args.device),
           "regression": {"shape": reg, "rows": regression(args.device, dtype, *reg, args.repeat)},
           "text": {"shape": txt, "rows": text_head(args.device, dtype, *txt, args.repeat)}}
    for section in ("regression", "text"):
        rows = out[section]["rows"]
        base = rows[0]
        for r in rows:
            r["peak_vs_naive"] = r["peak_mib"] / base["peak_mib"]
            r["time_vs_naive"] = r["time_ms"] / base["time_ms"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"device {args.device}, {dtype}, C++/CUDA extension: {out['extension']}")
    for section, label in (("regression", "regression head N,H,D"), ("text", "text head N,H,V")):
        print(f"\n{label} = {out[section]['shape']}")
        for r in out[section]["rows"]:
            print(f"  {r['name']:36s} peak {r['peak_mib']:8.1f} MiB ({r['peak_vs_naive']:.2f}x)   "
                  f"time {r['time_ms']:8.1f} ms ({r['time_vs_naive']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
