"""The Emu2 model chunk of one pipeline (virtual) stage, composed from megatron-core parts.

First stage: ViT + adapter + token embedding (visual embeddings replace ``<image>`` token
embeddings, then the SP scatter). Every stage: its slice of LLaMA layers. Last stage: final
RMSNorm + the two heads (see ``heads.py``).

Regression targets (the detached pooled ViT features) are produced on the first stage and
needed on the last one. They ride along in the pipeline activation: the tensor exchanged
between stages is ``cat([hidden [s(/tp), b, h], extra [e, b, h]])`` where ``extra`` holds the
flattened targets (zero-padded to a fixed capacity, so every p2p has one static shape).
Intermediate stages run their layers on the ``hidden`` rows and pass ``extra`` through.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build

from megatron_emu.config import derived
from megatron_emu.contracts import image_layout
from megatron_emu.contracts.batch import Emu2Batch, make_batch
from megatron_emu.model import multimodal, specs
from megatron_emu.model.adapter import Adapter, pool_patches
from megatron_emu.model.embedding import make_sync_free
from megatron_emu.model.heads import Emu2Heads
from megatron_emu.model.megatron_config import (
    lm_transformer_config,
    local_linear_config,
    vision_transformer_config,
    with_overrides,
)
from megatron_emu.model.spec import ModelSpec, extra_rows
from megatron_emu.model.vision import VisionEncoder
from megatron_emu.parallel.sizes import ParallelSizes


class Emu2Model(MegatronModule):
    """One pipeline chunk. ``forward(batch) ->`` the stage output (payload ``[s(/tp)+e, b, h]``)
    or, on the last stage, ``{"loss", "lm_loss", "reg_loss"}`` scalars of the micro-batch.

    Built from its ``ModelSpec`` and the process groups, which give the parallel sizes."""

    def __init__(self, spec: ModelSpec, pg_collection: ProcessGroupCollection,
                 pre_process: bool, post_process: bool, vp_stage: Optional[int] = None):
        sizes = ParallelSizes.from_groups(pg_collection)
        lm_config = lm_transformer_config(spec, sizes)
        super().__init__(config=lm_config)
        self.spec = spec
        self.pg_collection = pg_collection
        self.tp = sizes.tp
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.model_type = None  # set by the builder (megatron ModelType.encoder_or_decoder)
        # Untied embeddings (LLaMA): megatron-core's finalize_model_grads asks.
        self.share_embeddings_and_output_weights = False
        self.extra_rows = extra_rows(spec, sizes.pp)
        model = spec.model
        impl, lm = model.transformer_impl, model.lm
        self.input_tensor: Optional[torch.Tensor] = None
        if pre_process:
            self.vision = VisionEncoder(vision_transformer_config(spec, sizes), model.vision, impl,
                                        pg_collection, model.attention_backend)
            self.adapter = Adapter(with_overrides(local_linear_config(lm_config), sequence_parallel=False),
                                   model.vision.width, lm.hidden_size, pg_collection)
            self.embedding = LanguageModelEmbedding(
                config=lm_config, vocab_size=derived.padded_vocab_size(lm),
                max_sequence_length=lm.max_position_embeddings, position_embedding_type="rope",
                scatter_to_sequence_parallel=False, tp_group=pg_collection.tp,
            )
            make_sync_free(self.embedding.word_embeddings)
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=lm_config.kv_channels, rotary_percent=1.0, rotary_interleaved=False,
            rotary_base=lm.rope_theta, use_cpu_initialization=True,
        )
        n_layers = get_num_layers_to_build(lm_config, vp_stage=vp_stage, pp_rank=sizes.pp_rank)
        self.decoder = TransformerBlock(
            config=lm_config,
            spec=specs.block_spec(specs.lm_layer_spec(impl, model.attention_backend), n_layers, impl, post_process),
            post_layer_norm=True, pre_process=True, post_process=post_process,
            pg_collection=pg_collection, vp_stage=vp_stage,
        )
        if post_process:
            self.heads = Emu2Heads(local_linear_config(lm_config), lm.vocab_size, derived.padded_vocab_size(lm),
                                   model.vision.width, pg_collection,
                                   lm_ce_impl=model.loss.lm_ce_impl,
                                   regression_impl=model.loss.regression_impl)
        specs.bind_tp_group(self, pg_collection.tp)

    # -- pipeline plumbing -------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron-core's schedules with the activation received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _pack_targets(self, targets: torch.Tensor, b: int, h: int, dtype) -> torch.Tensor:
        """targets ``[N, width]`` -> zero-padded payload tail ``[e, b, h]``."""
        capacity = self.extra_rows * b * h
        flat = targets.detach().reshape(-1).to(dtype)
        if flat.numel() > capacity:
            raise ValueError(
                f"micro-batch has {targets.shape[0]} visual tokens; the pipeline carries at most "
                f"{capacity // self.spec.model.vision.width} (raise data.max_images_per_sequence)")
        return torch.nn.functional.pad(flat, (0, capacity - flat.numel())).view(self.extra_rows, b, h)

    def _split_payload(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """payload ``[s' + e, b, h]`` -> (hidden ``[s', b, h]``, tail ``[e, b, h]``)."""
        return payload[: payload.shape[0] - self.extra_rows], payload[payload.shape[0] - self.extra_rows:]

    # -- forward -----------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[n, 3, H, W]`` -> pooled visual features ``[n * n_query, width]``.

        A frozen ViT runs without autograd (no activations kept).
        """
        frozen = getattr(self, "_vision_frozen", None)
        if frozen is None:  # freezing happens once, after the model is built
            frozen = self._vision_frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = pool_patches(self.vision(images), self.spec.model.adapter.n_query)
        return feats.reshape(-1, feats.shape[-1])

    def _embed(self, batch: Emu2Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """First stage: ``[s(/tp), b, h]`` input embeddings and ``[N, width]`` visual features."""
        emb = self.embedding(input_ids=batch.tokens, position_ids=None)  # [s, b, h]
        width = self.spec.model.vision.width
        if batch.num_images > 0:
            feats = self.encode_images(batch.images)
            visual = self.adapter(feats)
        else:
            feats = emb.new_zeros(0, width)
            visual = emb.new_zeros(0, emb.shape[-1])
        emb = multimodal.scatter_image_embeddings(emb, batch.image_rows, visual)
        if self.config.sequence_parallel:
            emb = scatter_to_sequence_parallel_region(emb, group=self.pg_collection.tp)
        return emb, feats

    def forward(self, batch: Emu2Batch):
        tail = None
        if self.pre_process:
            hidden, feats = self._embed(batch)
        else:
            hidden, tail = self._split_payload(self.input_tensor)
        sp = self.tp if self.config.sequence_parallel else 1
        rotary = self.rotary_pos_emb(hidden.shape[0] * sp)  # RoPE over the full sequence
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
        if not self.post_process:
            if tail is None:
                tail = self._pack_targets(feats, hidden.shape[1], hidden.shape[2], hidden.dtype)
            return torch.cat([hidden, tail], dim=0)  # intermediate stages pass the tail through
        if tail is not None:  # the capacity rows of the payload, zero past the real ones
            width = self.spec.model.vision.width
            flat = tail.reshape(-1)
            feats = flat[: flat.numel() // width * width].view(-1, width)
        return self.losses(hidden, batch, feats.detach())

    @torch.no_grad()
    def forward_logits(self, tokens: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference on a TP1/PP1 model: tokens ``[b, s]`` (+ normalised images ``[n, 3, H, W]``,
        one per ``[IMG]``) -> next-token logits ``[b, s, vocab]`` (vocabulary padding trimmed)."""
        if not (self.pre_process and self.post_process) or self.config.sequence_parallel:
            raise RuntimeError("forward_logits needs the whole model on one rank (TP1, PP1, no SP)")
        batch = make_batch(tokens.cpu(), tokens.cpu(), torch.ones_like(tokens, device="cpu"), None,
                           image_id=image_layout.PLACEHOLDER_ID, ce_ignore_ids=(),
                           video_id=image_layout.VIDEO_SLOT_ID)
        batch = batch.to(tokens.device)
        batch.images = images
        hidden, _ = self._embed(batch)
        hidden = self.decoder(hidden_states=hidden, attention_mask=None,
                              rotary_pos_emb=self.rotary_pos_emb(hidden.shape[0]))
        logits = self.heads.logits(hidden)  # [s, b, V_padded]
        return logits[..., : self.spec.model.lm.vocab_size].transpose(0, 1).contiguous()

    def losses(self, hidden: torch.Tensor, batch: Emu2Batch,
               features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Last stage: final hidden ``[s(/tp), b, h]`` and the visual features ``[>=N, width]``
        -> scalar losses of the micro-batch."""
        loss_cfg = self.spec.model.loss
        lm_loss = self.heads.lm_loss(hidden, batch.labels, batch.ce_mask)
        targets = features.index_select(0, batch.reg_features)  # [R, width]
        reg_loss = self.heads.regression_loss(hidden, batch.reg_rows, targets)
        loss = loss_cfg.lm_weight * lm_loss + loss_cfg.reg_weight * reg_loss
        return {"loss": loss, "lm_loss": lm_loss.detach(), "reg_loss": reg_loss.detach()}
