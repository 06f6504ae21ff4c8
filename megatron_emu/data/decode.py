"""Image decoding for the loader, and normalisation on the training device.

Workers hand over uint8 pixels (4x less to move than float32, and normalising is cheaper on the
accelerator). Decoders:

- ``pil``: PIL/libjpeg-turbo in the loader workers (everywhere).
- ``dali_cpu``: NVIDIA DALI's CPU decoder, batched in the main process.
- ``dali``: DALI "mixed" decoding with nvJPEG on the GPU, batched in the main process; the
  result stays on the GPU.
- ``auto``: ``dali`` when a GPU and DALI are present, else ``pil``.

Every path returns ``uint8 [n, 3, H, W]``; they agree within JPEG decoder tolerance (a test
compares ``pil`` and ``dali_cpu``; a GPU test compares ``dali``).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("megatron_emu.data")

# OpenAI CLIP statistics (emu2_spec.md §6).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DECODERS = ("auto", "pil", "dali_cpu", "dali")


def decode_pil(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> ``uint8 [3, size, size]`` (resized bicubic only if the shard differs)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_decoder(name: str) -> str:
    """``auto`` -> a concrete decoder; an unavailable choice raises a clear error."""
    from megatron_emu.utils import device

    if name not in DECODERS:
        raise ValueError(f"data.decoder: {name!r} is not one of {DECODERS}")
    if name == "auto":
        return "dali" if device.has_cuda() and dali_available() else "pil"
    if name.startswith("dali") and not dali_available():
        raise ValueError(f"data.decoder={name} needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
    if name == "dali" and not device.has_cuda():
        raise ValueError("data.decoder=dali decodes on the GPU; use dali_cpu or pil without one")
    return name


class DaliDecoder:
    """Batched JPEG decoding with DALI: ``decoder(list_of_bytes) -> uint8 [n, 3, H, W]``
    (a CPU tensor for ``dali_cpu``, a GPU tensor for ``dali``). The shards hold images at the
    model size (the loader checks), so there is no resize step."""

    def __init__(self, size: int, max_batch: int, gpu: bool, num_threads: int = 2):
        from nvidia.dali import fn, pipeline_def, types

        from megatron_emu.utils import device

        self.size, self.max_batch, self.gpu = size, max(1, max_batch), gpu
        self.failed = 0

        @pipeline_def(batch_size=self.max_batch, num_threads=num_threads,
                      device_id=device.local_index() if gpu else None, prefetch_queue_depth=1)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            return fn.transpose(images, perm=[2, 0, 1])

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, encoded: list[bytes]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(encoded), self.max_batch):
            batch = encoded[start:start + self.max_batch]
            self.pipe.feed_input("jpegs", [np.frombuffer(b, dtype=np.uint8) for b in batch])
            try:
                (out,) = self.pipe.run()
                chunks.append(self._to_torch(out))
            except RuntimeError:  # an image DALI cannot decode: this batch image by image
                chunks.append(self._one_by_one(batch))
        if not chunks:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return torch.cat(chunks)

    def _one_by_one(self, batch: list[bytes]) -> torch.Tensor:
        """PIL decoding; an image that does not decode is black (its tokens stay) and counted in
        ``failed`` (the loader's ``bad_samples``)."""
        images = []
        for data in batch:
            try:
                images.append(decode_pil(data, self.size))
            except Exception as e:  # noqa: BLE001 - decoders of crafted bytes raise anything
                self.failed += 1
                log.warning("an image does not decode (%s: %s); a black image takes its place",
                            type(e).__name__, e)
                images.append(np.zeros((3, self.size, self.size), dtype=np.uint8))
        out = torch.from_numpy(np.stack(images))
        if self.gpu:
            from megatron_emu.utils import device

            out = out.to(device.device())
        return out

    def _to_torch(self, out) -> torch.Tensor:
        if self.gpu:
            return torch.from_dlpack(out.as_tensor())
        return torch.from_numpy(np.array(out.as_tensor()))


_STATS: dict = {}


def _stats(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean/std ``[1, 3, 1, 1]`` on ``dev``, made once per device (a copy from host memory
    would otherwise synchronise every micro-batch)."""
    key = str(dev)
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(dev)
                            for v in (CLIP_MEAN, CLIP_STD))
    return _STATS[key]


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [n, 3, H, W]`` (on the training device) -> CLIP-normalised ``dtype`` pixels."""
    mean, std = _stats(images.device)
    return ((images.float() / 255.0 - mean) / std).to(dtype)
