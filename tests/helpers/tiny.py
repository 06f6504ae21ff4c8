"""The tiny Emu2 preset, synthetic interleaved micro-batches, and the reference-model bridge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_emu.config.io import load_config
from megatron_emu.config.schema import EmuConfig
from megatron_emu.contracts import image_layout
from megatron_emu.contracts import vocab as st
from megatron_emu.contracts.batch import Emu2Batch, make_batch
from tests.helpers.reference import RefConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "emu2_tiny.yaml"


def tiny_config(tp=1, pp=1, vpp=None, sp=False, distopt=True, extra=()) -> EmuConfig:
    sets = [
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.virtual_pipeline_model_parallel_size={'null' if vpp is None else vpp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"parallel.use_distributed_optimizer={str(distopt).lower()}",
        f"parallel.batch_p2p_comm={'false' if vpp else 'true'}",
        "train.freeze=[]",  # layout tests train every module unless they freeze one
        *extra,
    ]
    return load_config(TINY, sets)


def ref_config(cfg: EmuConfig) -> RefConfig:
    v, lm = cfg.model.vision, cfg.model.lm
    return RefConfig(
        image_size=v.image_size, patch_size=v.patch_size, vision_width=v.width,
        vision_layers=v.num_layers, vision_heads=v.num_heads, vision_mlp_dim=v.mlp_dim,
        vision_eps=v.layer_norm_eps, n_query=cfg.model.adapter.n_query,
        hidden_size=lm.hidden_size, num_layers=lm.num_layers, num_heads=lm.num_attention_heads,
        ffn_hidden_size=lm.ffn_hidden_size, vocab_size=lm.vocab_size, rms_eps=lm.norm_eps,
        rope_theta=lm.rope_theta, num_kv_heads=lm.num_query_groups,
    )


def _sequence(g: torch.Generator, cfg: EmuConfig, n_images: int, video_frames: int = 0) -> list[int]:
    """``<s>`` text ([IMG] <image>*n [/IMG] text)* ``</s>`` [PAD]... of exactly seq_length ids;
    with ``video_frames``, a video block ([VIDEO] + frames of [IMG] [gIMG]*n [/IMG]) after <s>."""
    s, nq = cfg.train.seq_length, cfg.model.adapter.n_query
    seq = [st.BOS_ID]
    if video_frames:
        seq += image_layout.video_block(video_frames, nq)
    for _ in range(n_images):
        seq += torch.randint(3, 1000, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        seq += [st.IMG_ID] + [st.IMAGE_ID] * nq + [st.IMG_END_ID]
    seq += torch.randint(3, 32000, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
    seq += [st.EOS_ID]
    assert len(seq) <= s, "sequence too long for the tiny preset"
    return seq + [st.PAD_ID] * (s - len(seq))


def make_microbatches(cfg: EmuConfig, seed: int = 0, video_frames: int = 0,
                      regress_video: bool = False) -> list[Emu2Batch]:
    """A global batch of interleaved samples split into micro-batches (every layout sees the
    same micro-batches; data-parallel rank r takes micro-batches r, r + dp, ...). With
    ``video_frames``, the first sample of every micro-batch starts with a video of that many
    frames (its images: frames first, in slot order)."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.model.vision
    out = []
    n_micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
    for m in range(n_micro):
        rows = [_sequence(g, cfg, n_images=(m + i) % (3 if video_frames else 4),
                          video_frames=video_frames if i == 0 else 0)
                for i in range(cfg.train.micro_batch_size)]
        tokens = torch.tensor(rows, dtype=torch.long)
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = st.PAD_ID
        loss_mask = torch.ones_like(tokens, dtype=torch.float)
        loss_mask[:, -1] = 0
        n_img = int((tokens == st.IMG_ID).sum())
        images = torch.randn(n_img, 3, v.image_size, v.image_size, generator=g)
        ignore = image_layout.ce_ignore_names(cfg.model.loss.ce_ignore_tokens)
        out.append(make_batch(tokens, labels, loss_mask, images, image_id=st.IMAGE_ID,
                              ce_ignore_ids=[st.token_id(t) for t in ignore], video_id=st.GIMG_ID,
                              regress_video=regress_video))
    return out


def make_tuning_microbatches(cfg: EmuConfig, regression: str, seed: int = 0) -> list[Emu2Batch]:
    """Fine-tuning micro-batches assembled by the data layer (``build_sequence``): every sample
    packs a conversation (system text, [USER]: an image and a question, [ASSISTANT]: an answer,
    a second turn; only answers trained) and an editing sample (source image, instruction,
    target image), with ``regression`` (``train.regression``) choosing the regressed images."""
    from megatron_emu.data.sequence import build_sequence
    from megatron_emu.data.shard_format import Document

    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> tuple[str, list]:
        return ("text", torch.randint(3, 1000, (n,), generator=g).tolist())

    v, nq = cfg.model.vision, cfg.model.adapter.n_query
    out = []
    for m in range(cfg.train.global_batch_size // cfg.train.micro_batch_size):
        seqs = []
        for i in range(cfg.train.micro_batch_size):
            chat = Document("chat", "chat", [text(3), ("special", st.USER_ID), text(1), ("image", b"q"), text(2 + i),
                                             ("special", st.ASSISTANT_ID), text(1), text(3 + m % 3),
                                             ("special", st.EOS_ID), ("special", st.USER_ID), text(2),
                                             ("special", st.ASSISTANT_ID), text(1), text(2)],
                            no_loss=frozenset({0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12}))
            edit = Document("edit", "edit", [("image", b"src"), text(2 + m % 2), ("image", b"tgt")])
            seqs.append(build_sequence([(chat, True), (edit, True)], cfg.train.seq_length, nq,
                                       cfg.data.max_images_per_sequence, regression))
        assert all(s.loss_mask[-1] == 0 and len(s.images) == 3 for s in seqs), "the tiny sequence is too short"
        images = torch.randn(sum(len(s.images) for s in seqs), 3, v.image_size, v.image_size, generator=g)
        ignore = image_layout.ce_ignore_names(cfg.model.loss.ce_ignore_tokens)
        out.append(make_batch(*(torch.from_numpy(np.stack([getattr(s, k) for s in seqs]))
                                for k in ("tokens", "labels", "loss_mask")), images, image_id=st.IMAGE_ID,
                              ce_ignore_ids=[st.token_id(t) for t in ignore], video_id=st.GIMG_ID,
                              reg_mask=np.stack([s.reg_mask for s in seqs])))
    return out
