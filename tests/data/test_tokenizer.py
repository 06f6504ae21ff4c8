"""The Emu2 tokenizer directory: exact special-token ids, and transformers as the oracle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_tools.cli import main as data_cli
from data_tools.tokenizer import build
from megatron_emu.contracts import vocab as st
from megatron_emu.data.tokenizer import Emu2Tokenizer, TokenizerError

LLAMA = Path(__file__).resolve().parents[3] / "shared" / "data" / "llama_tokenizer.model"
TEXTS = ["A photo of an emu egg", "Chelsea the cat, a tabby.", "Numbers 1234 and ünïcödé, plus a man",
         "spaces\tand a tab\nand a new line"]
# Web text that spells special tokens: it must stay text (only sequence assembly places special ids).
SPECIAL_TEXTS = ["[IMG]<image><image>[/IMG]Chelsea the cat, a tabby.",
                 "plus <phrase>a man</phrase><object> and <s> or </s> or <unk>",
                 " ".join(st.ADDED_TOKENS + st.CHAT_TOKENS)]
# Runs of spaces are segmented differently by SentencePiece (what the original Emu2 code used)
# and by transformers' tokenizers backend; preprocessing collapses them (test_preprocess).


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    if not LLAMA.is_file():
        pytest.skip(f"the LLaMA tokenizer model is not at {LLAMA}")
    out = tmp_path_factory.mktemp("llama") / "tok"
    assert data_cli(["tokenizer", "--llama-model", str(LLAMA), "--out", str(out)]) == 0
    return out


def test_llama_tokenizer_has_emu2_ids(llama_dir):
    from transformers import AutoTokenizer

    tok = Emu2Tokenizer(llama_dir)
    # emu2_spec.md §1.7: "[IMG]<image><image><image>[/IMG]A photo" (after <s>), as sequence
    # assembly writes it; transformers maps the spelled-out layout to the same ids.
    ids = [st.IMG_ID] + [st.IMAGE_ID] * 3 + [st.IMG_END_ID] + tok.encode("A photo")
    assert ids == [32001, 32003, 32003, 32003, 32002, 319, 15373]
    hf = AutoTokenizer.from_pretrained(str(llama_dir))
    assert hf("[IMG]<image><image><image>[/IMG]A photo").input_ids == [st.BOS_ID] + ids
    assert tok.vocab_size == 32272


@pytest.mark.parametrize("which", ["llama", "trained"])
def test_special_token_strings_in_text_stay_text(which, llama_dir, tokenizer_dir):
    """``<image>``, ``[IMG]``, ``<s>`` ... typed in raw text never become special ids: the ids
    are SentencePiece's own encoding of the whole string, and decode back to it."""
    import sentencepiece as spm

    directory = llama_dir if which == "llama" else tokenizer_dir
    tok = Emu2Tokenizer(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    for text in SPECIAL_TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert all(3 <= i < st.LLAMA_VOCAB_SIZE or i == st.UNK_ID for i in ids), text
        assert tok.decode(ids) == text
    assert st.IMAGE_ID not in tok.encode("<image>" * 10)
    with pytest.raises(UnicodeEncodeError):
        tok.encode("lone \ud800 surrogate")


@pytest.mark.parametrize("which", ["llama", "trained"])
def test_transformers_loads_and_agrees(which, llama_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    directory = llama_dir if which == "llama" else tokenizer_dir
    hf = AutoTokenizer.from_pretrained(str(directory))
    ours = Emu2Tokenizer(directory)
    assert len(hf) == st.EMU2_VOCAB_SIZE
    names = ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[gIMG]", "<REC>", "<patch_index_0000>", "<patch_index_0256>"]
    assert hf.convert_tokens_to_ids(names) == [st.token_id(n) for n in names]
    assert hf.pad_token == "[PAD]" and hf.bos_token_id == st.BOS_ID and hf.eos_token_id == st.EOS_ID
    for text in TEXTS:
        assert hf(text).input_ids == [st.BOS_ID] + ours.encode(text), text


def test_trained_tokenizer_is_deterministic_and_padded(samples, tokenizer_dir, tmp_path):
    again = build(tmp_path / "again", train_text=samples / "corpus.txt", vocab_size=800)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    assert again.sp.get_piece_size() == st.LLAMA_VOCAB_SIZE
    ids = again.encode(" ".join(TEXTS))
    assert max(i for i in ids if i < st.LLAMA_VOCAB_SIZE) < 800  # never an UNUSED pad piece
    assert again.decode(again.encode("Chelsea the cat")) == "Chelsea the cat"


def test_bad_tokenizer_directories(tokenizer_dir, tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        Emu2Tokenizer(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tokenizer_dir, broken)
    (broken / "added_tokens.json").write_text('{"[PAD]": 5}')
    with pytest.raises(TokenizerError, match="special-token ids"):
        Emu2Tokenizer(broken)
    with pytest.raises(ValueError, match="vocab-size"):
        build(tmp_path / "x", train_text=tmp_path / "none.txt", vocab_size=40000)
