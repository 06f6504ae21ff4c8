"""``megatron-emu-data tokenizer``: write an Emu2 tokenizer directory (Hugging Face layout).

Two ways in:
- ``--llama-model tokenizer.model``: the LLaMA SentencePiece model (32000 pieces) as is, plus the
  Emu2 special tokens at ids 32000..32271 (emu2_spec.md §1.6, §5.7).
- ``--train TEXTFILE --vocab-size N``: train a small SentencePiece model on real text (tiny runs,
  tests), then pad it with never-produced ``UNUSED`` pieces to 32000 so the special tokens get the
  very same ids as Emu2 and the tiny model shares the 37B model's vocabulary layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from megatron_emu.contracts import vocab as st
from megatron_emu.data.tokenizer import ADDED_TOKENS_FILE, MODEL_FILE, Emu2Tokenizer

log = logging.getLogger("megatron_emu.data_tools.tokenizer")


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_hf_files(out: Path, chat: bool = False) -> None:
    """``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json`` (§5.7);
    ``chat``: Emu2-Chat's, with ``[USER]`` / ``[ASSISTANT]`` after the 272 Emu2 tokens."""
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1e30,
        "pad_token": None,
        "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"),
        "sp_model_kwargs": {},
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": st.PAD, "additional_special_tokens":
                   list(st.ADDITIONAL_SPECIAL_TOKENS) + (list(st.CHAT_TOKENS) if chat else [])}
    added = {tok: st.TOKEN_IDS[tok] for tok in st.ADDED_TOKENS}
    if chat:
        added.update(st.CHAT_IDS)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out / ADDED_TOKENS_FILE).write_text(json.dumps(added, indent=2) + "\n")


def _pad_model(model_bytes: bytes, size: int) -> bytes:
    """Append ``UNUSED`` pieces (never produced by encoding) until the model has ``size`` pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    # The trainer records its temporary paths; drop them so the bytes depend on the text only.
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    have = len(proto.pieces)
    if have > size:
        raise ValueError(f"trained model has {have} pieces, more than {size}")
    for i in range(have, size):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused_{i}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
    return proto.SerializeToString()


def train_model(text_file: Path, vocab_size: int) -> bytes:
    """A small LLaMA-style SentencePiece BPE model (unk 0, bos 1, eos 2, byte fallback) padded
    to 32000 pieces. Deterministic for the same text and options."""
    import sentencepiece as spm

    if vocab_size >= st.LLAMA_VOCAB_SIZE:
        raise ValueError(f"--vocab-size must be below {st.LLAMA_VOCAB_SIZE}, got {vocab_size}")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, num_threads=1, hard_vocab_limit=False, split_digits=True,
            add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            minloglevel=2)
        return _pad_model(Path(prefix + ".model").read_bytes(), st.LLAMA_VOCAB_SIZE)


def build(out: str | Path, *, llama_model: str | Path | None = None,
          train_text: str | Path | None = None, vocab_size: int = 1000, chat: bool = False) -> Emu2Tokenizer:
    """Write the tokenizer directory atomically and return it loaded (which checks the ids)."""
    if (llama_model is None) == (train_text is None):
        raise ValueError("give exactly one of --llama-model or --train")
    out = Path(out)
    if llama_model is not None:
        model_bytes = Path(llama_model).read_bytes()
    else:
        model_bytes = train_model(Path(train_text), vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        write_hf_files(tmp, chat=chat)
        Emu2Tokenizer(tmp)  # validates piece count and ids before anything is published
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tok = Emu2Tokenizer(out)
    log.info("wrote the Emu2 tokenizer to %s (%d ids)", out, tok.vocab_size)
    return tok
