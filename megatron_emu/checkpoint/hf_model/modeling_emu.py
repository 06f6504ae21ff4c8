"""Emu2 for transformers: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

Written for megatron_emu (plain torch + transformers' own LLaMA); ``megatron-emu-convert
mcore-to-hf`` copies it into every Emu2 directory it writes, with ``configuration_emu.py`` and
``visual.py``. Class names and the module tree are those of BAAI's Emu2 release, so BAAI's
Hugging Face weights load too::

    EmuForCausalLM
    ├── model: EmuModel
    │   ├── visual: EVAVisionTransformer          (visual.py)
    │   └── decoder: EmuForClsAndRegression
    │       └── lm: transformers.LlamaForCausalLM
    ├── project_down: Linear(hidden -> d_model, no bias)   (regression head)
    └── project_up: Linear(d_model -> hidden, no bias)     (adapter)

An image is encoded by the ViT (CLS dropped), its ``grid x grid`` patch features are average-
pooled to ``n_query`` tokens (raster order), projected by ``project_up`` and put in place of the
``<image>`` tokens (id 32003) of the prompt, in order; video frames go to the ``[gIMG]`` tokens
(32004) with ``v_query`` tokens each. A prompt for one image is ``[IMG]`` + ``<image>`` x
``n_query`` + ``[/IMG]``. ``forward`` returns transformers' ``CausalLMOutputWithPast`` (logits
over the vocabulary); ``generate`` returns the new token ids only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_emu import EmuConfig
from .visual import EVAVisionTransformer

try:  # transformers >= 5: initialisers that leave loaded tensors alone
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - older transformers only initialise missing modules
    _init = nn.init

IMAGE_TOKEN_ID = 32003  # <image>
VIDEO_TOKEN_ID = 32004  # [gIMG]


class EmuForClsAndRegression(nn.Module):
    """Holds the LLaMA decoder (``lm``) under BAAI's module name."""

    def __init__(self, config: EmuConfig):
        super().__init__()
        self.lm = LlamaForCausalLM(LlamaConfig(**config.llama_kwargs()))
        self.lm.model.embed_tokens.padding_idx = config.pad_token_id


class EmuModel(nn.Module):
    """The ViT (``visual``) and the decoder (``decoder.lm``)."""

    def __init__(self, config: EmuConfig):
        super().__init__()
        self.visual = EVAVisionTransformer(config.vision_config)
        self.decoder = EmuForClsAndRegression(config)
        self.n_query = config.vision_config["n_query"]
        self.v_query = config.vision_config.get("v_query", self.n_query)

    def encode_image(self, image: torch.Tensor, n_query: int = None) -> torch.Tensor:
        """``[b, 3, H, W]`` normalised pixels -> pooled features ``[b, n_query, width]``."""
        n_query = n_query or self.n_query
        x = self.visual(image)[:, 1:]  # CLS dropped: [b, grid^2, width]
        b, n, c = x.shape
        grid, side = math.isqrt(n), math.isqrt(n_query)
        if grid * grid != n or side * side != n_query or grid % side:
            raise ValueError(f"cannot pool a {grid}x{grid} patch grid to {n_query} tokens")
        x = x.transpose(1, 2).reshape(b, c, grid, grid)
        x = F.avg_pool2d(x, kernel_size=grid // side, stride=grid // side)
        return x.flatten(2).transpose(1, 2).contiguous()


class EmuPreTrainedModel(PreTrainedModel):
    config_class = EmuConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaDecoderLayer", "Block"]
    _skip_keys_device_placement = "past_key_values"
    # BAAI's checkpoints (transformers 4.31) store LLaMA's RoPE frequencies; they are recomputed.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EVAVisionTransformer):
            _init.normal_(module.cls_token, std=self.config.initializer_range)
            _init.normal_(module.pos_embed, std=self.config.initializer_range)


class EmuForCausalLM(EmuPreTrainedModel):
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: EmuConfig):
        super().__init__(config)
        self.model = EmuModel(config)
        self.project_down = nn.Linear(config.hidden_size, config.d_model, bias=False)  # LM -> visual
        self.project_up = nn.Linear(config.d_model, config.hidden_size, bias=False)  # visual -> LM
        self.n_query, self.v_query = self.model.n_query, self.model.v_query
        self.post_init()

    @property
    def lm(self) -> LlamaForCausalLM:
        return self.model.decoder.lm

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def encode_image(self, image: torch.Tensor, n_query: int = None) -> torch.Tensor:
        """Pooled visual features ``[b, n_query, d_model]`` (the space ``project_down`` regresses)."""
        return self.model.encode_image(image, n_query)

    def embed(self, input_ids: torch.LongTensor, image: torch.Tensor = None,
              video: torch.Tensor = None) -> torch.Tensor:
        """Token embeddings ``[b, s, hidden]`` with ``project_up(visual features)`` at the
        ``<image>`` (images, ``n_query`` each) and ``[gIMG]`` (video frames, ``v_query`` each)
        positions, filled in order (batch, then position)."""
        embeds = self.get_input_embeddings()(input_ids)
        for pixels, token_id, n_query, what in ((image, IMAGE_TOKEN_ID, self.n_query, "<image>"),
                                                (video, VIDEO_TOKEN_ID, self.v_query, "[gIMG]")):
            if pixels is None:
                continue
            pixels = pixels.to(device=embeds.device)
            feats = self.project_up(self.encode_image(pixels, n_query)).reshape(-1, embeds.shape[-1])
            mask = input_ids == token_id
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"the prompt has {int(mask.sum())} {what} tokens but {pixels.shape[0]} "
                                 f"image(s) x {n_query} tokens were given")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.LongTensor = None, image: torch.Tensor = None, video: torch.Tensor = None,
                attention_mask: torch.Tensor = None, inputs_embeds: torch.Tensor = None,
                labels: torch.LongTensor = None, past_key_values=None, use_cache: bool = None, **kwargs):
        """Logits ``[b, s, vocab]`` (``CausalLMOutputWithPast``; the loss too with ``labels``)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image, video)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       use_cache=use_cache, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, image: torch.Tensor = None, video: torch.Tensor = None,
                 attention_mask: torch.Tensor = None, **kwargs) -> torch.LongTensor:
        """New token ids ``[b, new]`` after the prompt (images / video frames filled in);
        ``kwargs`` go to transformers' ``generate`` (``max_new_tokens``, ``do_sample``,
        ``num_beams``, ...)."""
        embeds = self.embed(input_ids, image, video)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, getattr(self.config, name))
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
