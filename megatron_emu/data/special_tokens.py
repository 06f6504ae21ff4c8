"""Moved to ``megatron_emu.contracts.vocab`` (the vocabulary contract).

This re-export stays only for ``megatron_emu/checkpoint/hf_config.py`` and
``megatron_emu/inference/generate.py`` (left unchanged here while the Hugging Face conversion
work on them settles); they switch to ``contracts.vocab`` in the follow-up that moves the
checkpoint format into contracts, which deletes this file. Nothing else imports it
(tests/unit/test_layering.py).
"""

from megatron_emu.contracts.vocab import (  # noqa: F401
    ADDED_TOKENS,
    ADDITIONAL_SPECIAL_TOKENS,
    ASSISTANT_ID,
    BOS_ID,
    CHAT_IDS,
    CHAT_TOKENS,
    CHAT_VOCAB_SIZE,
    EMU2_VOCAB_SIZE,
    EOS_ID,
    GIMG,
    IMAGE,
    IMAGE_ID,
    IMG,
    IMG_END,
    IMG_END_ID,
    IMG_ID,
    LLAMA_VOCAB_SIZE,
    PAD,
    PAD_ID,
    TOKEN_IDS,
    UNK_ID,
    USER_ID,
    token_id,
)
