"""The vocabulary contract: the Emu2 special tokens and their ids, the single source of these ids
(the data layer writes them, the model and the config validator read them, conversion and
generation emit them).

The LLaMA SentencePiece model has 32000 pieces (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2); Emu2 adds
``[PAD]`` and then 271 ``additional_special_tokens`` in this order, giving 32272 ids.
"""

from __future__ import annotations

LLAMA_VOCAB_SIZE = 32000
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

PAD = "[PAD]"
IMG = "[IMG]"
IMG_END = "[/IMG]"
IMAGE = "<image>"
GIMG = "[gIMG]"
VIDEO = "[VIDEO]"

_NAMED = [
    IMG, IMG_END, IMAGE, GIMG, "[/gIMG]", "[EOC]", VIDEO, "<grounding>",
    "<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<REC>",
]
ADDITIONAL_SPECIAL_TOKENS: list[str] = _NAMED + [f"<patch_index_{i:04d}>" for i in range(257)]
CHAT_TOKENS = ["[USER]", "[ASSISTANT]"]

# Added tokens in id order, starting at 32000.
ADDED_TOKENS: list[str] = [PAD] + ADDITIONAL_SPECIAL_TOKENS
TOKEN_IDS: dict[str, int] = {tok: LLAMA_VOCAB_SIZE + i for i, tok in enumerate(ADDED_TOKENS)}
TOKEN_IDS.update({"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID})
EMU2_VOCAB_SIZE = LLAMA_VOCAB_SIZE + len(ADDED_TOKENS)  # 32272

# Emu2-Chat adds [USER] and [ASSISTANT] right after.
CHAT_IDS: dict[str, int] = {tok: EMU2_VOCAB_SIZE + i for i, tok in enumerate(CHAT_TOKENS)}
USER_ID, ASSISTANT_ID = CHAT_IDS["[USER]"], CHAT_IDS["[ASSISTANT]"]
CHAT_VOCAB_SIZE = EMU2_VOCAB_SIZE + len(CHAT_TOKENS)  # 32274

PAD_ID = TOKEN_IDS[PAD]
IMG_ID = TOKEN_IDS[IMG]
IMG_END_ID = TOKEN_IDS[IMG_END]
IMAGE_ID = TOKEN_IDS[IMAGE]
GIMG_ID = TOKEN_IDS[GIMG]
VIDEO_ID = TOKEN_IDS[VIDEO]


def token_id(name: str) -> int:
    """Id of a special token by name; raises ``KeyError`` naming the unknown token."""
    try:
        return TOKEN_IDS[name]
    except KeyError:
        raise KeyError(f"unknown special token {name!r}") from None
