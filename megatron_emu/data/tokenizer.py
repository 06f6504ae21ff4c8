"""The Emu2 tokenizer at run time: a LLaMA SentencePiece model plus the Emu2 special tokens.

A tokenizer directory (written by ``megatron-emu-data tokenizer``) has the Hugging Face layout:
``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
``added_tokens.json``. Special tokens keep the exact ids of ``contracts/vocab.py`` (``[PAD]`` 32000,
``[IMG]`` 32001, ...). Text never produces them: ``encode`` hands the whole string to
SentencePiece, so a literal ``<image>`` or ``[IMG]`` in web text becomes ordinary pieces; only
sequence assembly places the special ids (around real images).

Only sentencepiece is imported here (no torch), so the data tools can use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sentencepiece as spm

from megatron_emu.contracts import vocab as st

MODEL_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"


class TokenizerError(ValueError):
    """A tokenizer directory is missing files or disagrees with the Emu2 special-token ids."""


class Emu2Tokenizer:
    """Encode text segments to ids and decode ids, special tokens included.

    ``encode`` returns the pieces of one text segment without ``<s>``/``</s>`` (sequence
    assembly adds them); ``decode`` renders special ids by name.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        model = self.directory / MODEL_FILE
        added = self.directory / ADDED_TOKENS_FILE
        for f in (model, added):
            if not f.is_file():
                raise TokenizerError(f"tokenizer directory {self.directory} has no {f.name} "
                                     f"(make one with `megatron-emu-data tokenizer`)")
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        if self.sp.get_piece_size() != st.LLAMA_VOCAB_SIZE:
            raise TokenizerError(f"{model} has {self.sp.get_piece_size()} pieces; Emu2 ids need "
                                 f"exactly {st.LLAMA_VOCAB_SIZE} before the special tokens")
        table = json.loads(added.read_text())
        expected = {tok: st.TOKEN_IDS[tok] for tok in st.ADDED_TOKENS}
        self.chat = any(tok in table for tok in st.CHAT_TOKENS)  # Emu2-Chat: [USER], [ASSISTANT]
        if self.chat:
            expected.update(st.CHAT_IDS)
        wrong = {k: v for k, v in table.items() if expected.get(k) != v}
        missing = sorted(set(expected) - set(table))
        if wrong or missing:
            raise TokenizerError(f"{added} disagrees with the Emu2 special-token ids: "
                                 f"wrong {dict(list(wrong.items())[:3])}, missing {missing[:3]}")
        self.id_to_special = {v: k for k, v in expected.items()}

    @property
    def vocab_size(self) -> int:
        return st.CHAT_VOCAB_SIZE if self.chat else st.EMU2_VOCAB_SIZE

    def fingerprint(self) -> str:
        """sha256 of the SentencePiece model (recorded in datasets made with this tokenizer)."""
        return hashlib.sha256((self.directory / MODEL_FILE).read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of a text segment, all below 32000 and never ``<s>``/``</s>``: special-token
        strings in the text (``<image>``, ``[IMG]``, ``<s>``, ...) are encoded as plain text.
        Raises ``UnicodeEncodeError`` for text that is not valid Unicode (a lone surrogate)."""
        text.encode("utf-8")  # sentencepiece would raise a less clear error
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ids; special ids are rendered by name, ``<s>``/``</s>`` included."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.id_to_special or i in (st.BOS_ID, st.EOS_ID):
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                parts.append(self.id_to_special.get(i) or ("<s>" if i == st.BOS_ID else "</s>"))
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)
