"""Fine-tuning data (docs/tuning.md): a LLaVA conversation and Emu2-Gen samples, preprocessed with
a real chat tokenizer from real photos, give exactly the hand-written token ids; the answer-only
cross-entropy mask and the last-image regression mask are exact; bad records are skipped."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from data_tools.preprocess import Options, run
from data_tools.tokenizer import build
from megatron_emu.contracts import chat_template
from megatron_emu.data import shard_format as sf
from megatron_emu.data.loader import EmuDataLoader, LoaderSpec
from megatron_emu.data.sequence import build_sequence
from megatron_emu.data.tokenizer import Emu2Tokenizer
from tests.helpers.datasets import IMAGE_SIZE

PAD, BOS, EOS, IMG, END, IMAGE, VIDEO = 32000, 1, 2, 32001, 32002, 32003, 32007
USER, ASSISTANT = 32272, 32273
GROUNDING, PHRASE, PHRASE_END, OBJECT, OBJECT_END = 32008, 32009, 32010, 32011, 32012


@pytest.fixture(scope="module")
def chat_tok(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tok") / "tokenizer"
    build(out, train_text=samples / "corpus.txt", vocab_size=800, chat=True)
    return Emu2Tokenizer(out)


def _documents(samples, tok, fmt: str, records: list, tmp_path, **kw) -> tuple[list, dict]:
    src = tmp_path / f"input.{'json' if fmt == 'llava' else 'jsonl'}"
    if fmt == "llava":
        src.write_text(json.dumps(records))
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    summary = run(Options(format=fmt, inputs=[str(src)], images=str(samples / "chat"), tokenizer=str(tok.directory),
                          out=str(out), image_size=IMAGE_SIZE, progress=False, **kw))
    meta, index = sf.load_index(out)
    docs = [sf.decode_document(str(i), sf.read_span(out / meta["shards"][int(r[0])], int(r[1]), int(r[2])))
            for i, r in enumerate(index)]
    return docs, summary


def _expected(pieces: list[tuple[list[int], bool]], seq_length: int):
    """Hand-written layout: (ids, trained) pieces -> (full ids padded to seq_length + 1, CE mask)."""
    ids = [i for p, _ in pieces for i in p]
    assert len(ids) <= seq_length + 1
    trained = [t for p, t in pieces for _ in p]
    full = ids + [PAD] * (seq_length + 1 - len(ids))
    mask = [1.0 if t else 0.0 for t in trained[1:]] + [0.0] * (seq_length - len(ids) + 1)
    return full, mask


def test_a_conversation_has_the_exact_chat_layout_and_answer_only_targets(samples, chat_tok, tmp_path):
    record = {"id": "c1", "image": "images/chelsea_0.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown in this picture?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Is it a photograph?"}, {"from": "gpt", "value": "Yes."}]}
    (doc,), summary = _documents(samples, chat_tok, "llava", [record], tmp_path)
    assert summary["chat"] == 1 and doc.kind == "chat"
    e = chat_tok.encode
    sys_msg = "You are a helpful assistant, dedicated to provide concise and efficient answers."
    pieces = [([BOS], True), (e(sys_msg), False), ([USER], False), (e(":"), False), ([IMG, IMAGE, IMAGE, END], False),
              (e("What is shown in this picture?"), False), ([ASSISTANT], False), (e(":"), False),
              (e("A cat."), True), ([EOS], True), ([USER], False), (e(": Is it a photograph?"), False),
              ([ASSISTANT], False), (e(":"), False), (e("Yes."), True), ([EOS], True)]
    seq_length = 128
    full, mask = _expected(pieces, seq_length)
    seq = build_sequence([(doc, True)], seq_length, n_query=2, max_images=8, regression="none")
    assert seq.tokens.tolist() == full[:-1] and seq.labels.tolist() == full[1:]
    assert seq.loss_mask.tolist() == mask
    assert sum(mask) == len(e("A cat.")) + len(e("Yes.")) + 2
    assert not seq.reg_mask.any() and len(seq.images) == 1
    # "all" would regress the user's image; the chat preset says none
    assert build_sequence([(doc, True)], seq_length, 2, 8, regression="all").reg_mask.sum() == 2


def test_system_message_choice_and_a_video_in_a_conversation(samples, chat_tok, tmp_path):
    record = {"id": "v", "video": "videos/1000.mp4", "conversations": [
        {"from": "human", "value": "What happens in this clip?"}, {"from": "gpt", "value": "A pan."}]}
    (doc,), _ = _documents(samples, chat_tok, "llava", [record], tmp_path, system_message="detailed",
                           video_frames=2)
    seq = build_sequence([(doc, True)], 128, n_query=1, max_images=8, regression="none")
    e = chat_tok.encode
    frame = [IMG, 32004, END]
    pieces = [([BOS], True), (e(chat_template.SYSTEM_MESSAGES["detailed"]), False), ([USER], False),
              (e(":"), False), ([VIDEO, *frame, *frame], False), (e("What happens in this clip?"), False),
              ([ASSISTANT], False), (e(":"), False), (e("A pan."), True), ([EOS], True)]
    full, mask = _expected(pieces, 128)
    assert seq.tokens.tolist() == full[:-1] and seq.loss_mask.tolist() == mask


def test_gen_samples_have_the_exact_layout_and_regress_only_the_last_image(samples, chat_tok, tmp_path):
    grounded = {"kind": "grounded", "key": "g", "image": "images/coffee_0.jpg", "segments": [
        {"text": "A photo of"}, {"phrase": "a cup", "box": [0.25, 0.5, 0.75, 1.0], "object": "images/coffee_1.jpg"},
        {"text": "on a table"}]}
    edit = {"kind": "edit", "key": "e", "source": "images/rocket_0.jpg", "instruction": "Make it black and white.",
            "target": "images/rocket_1.jpg"}
    (g, ed), summary = _documents(samples, chat_tok, "gen", [grounded, edit], tmp_path)
    assert (g.kind, ed.kind, summary["grounded"], summary["edit"]) == ("grounded", "edit", 1, 1)
    e, block = chat_tok.encode, [IMG, IMAGE, IMAGE, END]
    ids = [BOS, GROUNDING, *e("A photo of"), PHRASE, *e("a cup"), PHRASE_END, OBJECT, *block, OBJECT_END,
           *block, *e("on a table"), *block, EOS]
    seq = build_sequence([(g, True)], 48, n_query=2, max_images=8, regression="last_image")
    assert seq.tokens.tolist()[:len(ids)] == ids and seq.loss_mask.sum() == len(ids) - 1
    last = len(ids) - 1 - len(block)  # the whole photo's [IMG]
    assert np.flatnonzero(seq.reg_mask).tolist() == [last, last + 1]  # [IMG] and the first <image>
    assert build_sequence([(g, True)], 48, 2, 8, regression="all").reg_mask.sum() == 6
    # the box image: white box (x 0.25-0.75, y 0.5-1.0 of the side) on black
    box = np.asarray(Image.open(io.BytesIO(g.segments[6][1])).convert("L"), dtype=float)
    assert box[:IMAGE_SIZE // 3].max() < 40 and box[-IMAGE_SIZE // 8:, IMAGE_SIZE // 3:-IMAGE_SIZE // 3].min() > 215
    ids = [BOS, *block, *e("Make it black and white."), *block, EOS]
    both = build_sequence([(ed, True), (g, True)], 64, n_query=2, max_images=8, regression="last_image")
    assert both.tokens.tolist()[:len(ids)] == ids
    target = len(ids) - 1 - len(block)
    assert np.flatnonzero(both.reg_mask).tolist() == [target, target + 1, len(ids) + last, len(ids) + last + 1]


def test_bad_tuning_records_are_skipped_and_counted(samples, chat_tok, tmp_path):
    ok = {"id": "ok", "image": "images/moon_0.jpg",
          "conversations": [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "The moon."}]}
    too_many = {"id": "x", "image": "images/moon_0.jpg", "conversations": [
        {"from": "human", "value": "<image> <image> Two?"}, {"from": "gpt", "value": "No."}]}
    missing = {"id": "m", "image": "images/nowhere.jpg",
               "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "No."}]}
    no_answer = {"id": "q", "conversations": [{"from": "human", "value": "Hello?"}]}
    literal = {"id": "lit", "conversations": [{"from": "human", "value": "Write a tag."},
                                              {"from": "gpt", "value": "Here: <image>"}]}  # an answer is text
    docs, summary = _documents(samples, chat_tok, "llava", [ok, too_many, missing, no_answer, 7, literal], tmp_path)
    assert [d.source["input_key"] for d in docs] == ["ok", "lit"]
    assert docs[1].n_images == 0 and docs[1].segments[-1][1] == chat_tok.encode("Here: <image>")
    assert IMAGE not in build_sequence([(docs[0], True)], 48, 1, 8).tokens.tolist()[:3]  # image before the question
    assert summary["skipped"] == {"placeholder_mismatch": 1, "missing_image": 1, "malformed_json": 2}


def test_sample_tuning_data_preprocesses_cleanly_and_needs_the_chat_vocabulary(samples, chat_tok, tmp_path):
    out = tmp_path / "chat"
    summary = run(Options(format="llava", inputs=[str(samples / "chat" / "conversations.json")],
                          images=str(samples / "chat"), tokenizer=str(chat_tok.directory), out=str(out),
                          image_size=IMAGE_SIZE, progress=False, video_frames=2))
    assert summary["skipped"] == {} and summary["chat"] == summary["documents"] >= 40
    gen = run(Options(format="gen", inputs=[str(samples / "gen" / "gen.jsonl")], images=str(samples / "gen"),
                      tokenizer=str(chat_tok.directory), out=str(tmp_path / "gen"), image_size=IMAGE_SIZE,
                      progress=False))
    assert gen["skipped"] == {} and gen["grounded"] > 0 and gen["edit"] > 0
    spec = LoaderSpec(paths=((1.0, str(out)),), seq_length=96, n_query=1, image_size=IMAGE_SIZE,
                      micro_batch_size=2, num_workers=0, regression="none", vocab_size=32272)
    with pytest.raises(ValueError, match="model.lm.vocab_size=32274"):
        EmuDataLoader(spec)
    # through the loader: conversations train answers only and regress nothing; Gen samples
    # regress one image each (n_query 1: the [IMG] before each document's last <image>)
    chat = next(EmuDataLoader(replace(spec, vocab_size=32274))).to_batch([PAD, IMG, END, IMAGE])
    trained = chat.labels[chat.ce_mask > 0]
    assert chat.reg_rows.numel() == 0 and (trained == EOS).any()
    assert not np.isin(trained.numpy(), [USER, ASSISTANT, IMAGE, IMG, END, PAD, VIDEO]).any()
    assert float(chat.ce_mask.sum()) < 0.5 * float((chat.tokens != PAD).sum())
    loader = EmuDataLoader(replace(spec, paths=((1.0, str(tmp_path / "gen")),), regression="last_image"))
    gen_batch = next(loader).to_batch([PAD, IMG, END, IMAGE])
    documents = int((gen_batch.tokens == BOS).sum())
    assert 0 < gen_batch.reg_rows.numel() <= documents < int((gen_batch.tokens == IMAGE).sum())


def test_a_special_segment_that_is_not_a_template_token_makes_the_document_bad():
    from megatron_emu.data.bad_samples import check_document
    from megatron_emu.data.shard_format import Document

    good = Document("c", "chat", [("special", USER), ("text", [5]), ("special", ASSISTANT), ("text", [6]),
                                  ("special", EOS), ("special", GROUNDING)], no_loss=frozenset({0, 1, 2}))
    assert check_document(good) is None
    for bad in (IMAGE, IMG, BOS, PAD, VIDEO, 32274, -1):
        doc = Document("c", "chat", [("special", bad), ("text", [5])])
        assert "not a template or grounding token" in check_document(doc)


def test_llava_input_files_jsonl_and_refusals(samples, chat_tok, tmp_path):
    record = {"id": "j", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    lines = tmp_path / "c.jsonl"
    lines.write_text(json.dumps(record) + "\n{not json\n")
    opts = dict(format="llava", tokenizer=str(chat_tok.directory), image_size=IMAGE_SIZE, progress=False)
    summary = run(Options(inputs=[str(lines)], out=str(tmp_path / "a"), **opts))
    assert summary["chat"] == 1 and summary["skipped"] == {"malformed_json": 1}
    for name, text, what in (("obj.json", json.dumps(record), "a llava file holds a JSON list of records"),
                             ("bad.json", "[{", "not valid JSON")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"--input {tmp_path / name}: {what}"):
            run(Options(inputs=[str(tmp_path / name)], out=str(tmp_path / name.split(".")[0]), **opts))


def test_a_tuning_document_that_loses_its_image_or_video_trains_nothing():
    from megatron_emu.data.shard_format import Document

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    im = jpeg.getvalue()
    chat = Document("c", "chat", [("special", USER), ("video", [im] * 8), ("text", [5, 6]), ("special", ASSISTANT),
                                  ("text", [7, 8]), ("special", EOS)], no_loss=frozenset({0, 1, 2, 3}))
    # the chat preset before the fix: 8 frames x 258 + 1 = 2065 tokens never fit 2048
    seq = build_sequence([(chat, True)], 2048, n_query=256, max_images=8, regression="none")
    assert seq.loss_mask.sum() == 0 and seq.dropped == [0] and not seq.images
    assert build_sequence([(chat, True)], 2048, n_query=64, max_images=8, regression="none").loss_mask.sum() == 4
    over_cap = build_sequence([(chat, True)], 2048, n_query=4, max_images=7, regression="none")
    assert over_cap.loss_mask.sum() == 0 and over_cap.dropped == [0]
    edit = Document("e", "edit", [("image", im), ("text", [5, 6]), ("image", im)])
    seq = build_sequence([(edit, True)], 16, n_query=4, max_images=1, regression="last_image")
    assert seq.loss_mask.sum() == 0 and not seq.reg_mask.any() and seq.dropped == [0]
    # a T2I pair under last_image whose image is dropped: nothing regressed, nothing trained
    pair = Document("p", "pair", [("text", [5, 6]), ("image", im)])
    seq = build_sequence([(pair, False)], 7, n_query=4, max_images=8, regression="last_image")
    assert seq.loss_mask.sum() == 0 and seq.dropped == [0]
    # pretraining documents keep their text when an image is dropped; a later document is untouched
    inter = Document("i", "interleaved", [("text", [5, 6]), ("image", im), ("text", [7])])
    seq = build_sequence([(inter, True), (chat, True)], 2048, n_query=4, max_images=0, regression="all")
    assert seq.dropped == [1] and seq.loss_mask.sum() == 4  # <s> 5 6 7 </s>: four targets


def test_the_loader_counts_dropped_tuning_documents_and_refuses_videos_that_cannot_fit(samples, chat_tok,
                                                                                         tmp_path):
    gen = tmp_path / "gen"
    run(Options(format="gen", inputs=[str(samples / "gen" / "gen.jsonl")], images=str(samples / "gen"),
                tokenizer=str(chat_tok.directory), out=str(gen), image_size=IMAGE_SIZE, progress=False))
    spec = LoaderSpec(paths=((1.0, str(gen)),), seq_length=96, n_query=1, image_size=IMAGE_SIZE,
                      micro_batch_size=2, num_workers=0, regression="last_image", max_images=1)
    loader = EmuDataLoader(spec)
    batch = next(loader)  # every Gen sample has two or more images: each loses one
    assert float(batch.loss_mask.sum()) == 0 and not batch.reg_mask.any()
    assert loader.bad_samples == int((batch.tokens == BOS).sum()) > 0
    chat = tmp_path / "chat"
    summary = run(Options(format="llava", inputs=[str(samples / "chat" / "conversations.json")],
                          images=str(samples / "chat"), tokenizer=str(chat_tok.directory), out=str(chat),
                          image_size=IMAGE_SIZE, progress=False, video_frames=8))
    assert summary["videos"] > 0
    spec = replace(spec, paths=((1.0, str(chat)),), seq_length=2048, n_query=256, max_images=8, regression="none")
    with pytest.raises(ValueError, match=rf"data.path {chat}: its videos take 8 frames x 258 tokens .* 2067 tokens "
                                         r"but train.seq_length is 2048.*raise train.seq_length to at least 2066"):
        EmuDataLoader(spec)
    with pytest.raises(ValueError, match=rf"data.path {gen}: an image takes 258 tokens"):
        EmuDataLoader(replace(spec, paths=((1.0, str(gen)),), seq_length=200))
    EmuDataLoader(replace(spec, n_query=64)).close()  # 8 x 66 + 1 fits


def test_llava_deep_lines_and_sharegpt_system_turns(samples, chat_tok, tmp_path):
    record = {"id": "s", "conversations": [{"from": "system", "value": "Answer in French. <image>"},
                                           {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Salut."}]}
    deep = "[" * 100_000 + "]" * 100_000
    lines = tmp_path / "c.jsonl"
    lines.write_text(json.dumps(record) + "\n" + deep + "\n")
    opts = dict(format="llava", tokenizer=str(chat_tok.directory), image_size=IMAGE_SIZE, progress=False)
    summary = run(Options(inputs=[str(lines)], out=str(tmp_path / "a"), **opts))
    assert summary["chat"] == 1 and summary["skipped"] == {"malformed_json": 1}
    meta, index = sf.load_index(tmp_path / "a")
    doc = sf.decode_document("0", sf.read_span(tmp_path / "a" / meta["shards"][0], int(index[0][1]), int(index[0][2])))
    assert doc.segments[0][1] == chat_tok.encode("Answer in French. <image>") and doc.n_images == 0
    assert doc.segments[1] == ("special", USER) and 0 in doc.no_loss
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(ValueError, match=f"--input {tmp_path / 'deep.json'}: not valid JSON"):
        run(Options(inputs=[str(tmp_path / "deep.json")], out=str(tmp_path / "b"), **opts))


def test_answers_keep_their_layout_and_a_question_tokenizes_as_generate_chat_does(samples, chat_tok, tmp_path):
    from megatron_emu.inference.video import chat_prompt_ids

    question = "  Fix\u00a0this  code:\t\n\n    x = 1\u2028y  "
    answer = "Here:\n```python\ndef f():\n    return  1\n```"
    record = {"id": "code", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    (doc,), _ = _documents(samples, chat_tok, "llava", [record], tmp_path, system_message="none")
    texts = [v for k, v in doc.segments if k == "text"]
    assert texts[-1] == chat_tok.encode(answer)  # indentation and double spaces kept
    ids, _ = chat_prompt_ids(question, "", chat_tok, n_query=2, n_frames=1)
    assert ids == [BOS, USER, *texts[0], ASSISTANT, *texts[1]]


def test_user_and_assistant_ids_are_a_bad_sample_outside_conversations(samples, chat_tok, tmp_path):
    from data_tools.inspect import inspect
    from megatron_emu.data.bad_samples import check_document
    from megatron_emu.data.shard_format import Document

    assert "not a conversation" in check_document(Document("i", "interleaved", [("special", USER), ("text", [5])]))
    gen = tmp_path / "gen"
    run(Options(format="gen", inputs=[str(samples / "gen" / "gen.jsonl")], images=str(samples / "gen"),
                tokenizer=str(chat_tok.directory), out=str(gen), image_size=IMAGE_SIZE, progress=False))
    meta, index = sf.load_index(gen)
    doc = int(np.flatnonzero(index[:, sf.COL_KIND] == sf.KIND_CODES["grounded"])[0])
    path = gen / meta["shards"][int(index[doc, sf.COL_SHARD])]
    raw = bytearray(path.read_bytes())
    at = raw.index(b'{"special":%d}' % GROUNDING, int(index[doc, sf.COL_OFFSET]))
    raw[at:at + 17] = b'{"special":%d}' % USER  # a crafted grounded sample with [USER]
    path.write_bytes(bytes(raw))
    assert any("not a conversation" in b for b in inspect(gen)["broken"])
    loader = EmuDataLoader(LoaderSpec(paths=((1.0, str(gen)),), seq_length=96, n_query=1, image_size=IMAGE_SIZE,
                                      micro_batch_size=4, num_workers=0, regression="last_image"))
    for _ in range(6):
        batch = next(loader)
        assert f"0:{doc}" not in [k for keys in batch.keys for k in keys] and not (batch.tokens == USER).any()
    assert loader.bad_samples >= 1
