"""The Emu2-Chat template: how a conversation becomes a token sequence, and what is trained.

Layout (emu2_spec.md §1.7, the released chat code)::

    <s> {system message} [USER]: {question} [ASSISTANT]: {answer} </s>[USER]: {question} [ASSISTANT]: {answer} </s>

Only the answers and the ``</s>`` that closes each answer are cross-entropy targets (paper
§2.3.1); the system message, ``[USER]``, ``[ASSISTANT]``, the ``:`` after them, the questions and
their images or videos are not. The spaces around ``[USER]`` / ``[ASSISTANT]`` are the
SentencePiece word boundaries of the text pieces next to them (each text piece is encoded on its
own, which gives it its leading ``▁``). The last answer's ``</s>`` is the document's own
(sequence assembly closes every document with ``</s>``).

``<image>`` and ``<video>`` placeholders stay in the question text; the data layer (and
``megatron-emu-generate --chat``) turns them into image and video blocks (``image_layout.py``).
This module is pure: no tokenizer, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_emu.contracts import vocab

# The two system messages of Emu2-Chat (emu2_spec.md §1.7): short answers (academic tasks,
# grounding) and detailed ones (chat); "none": no system message.
SYSTEM_MESSAGES = {
    "short": "You are a helpful assistant, dedicated to provide concise and efficient answers.",
    "detailed": "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.",
    "none": "",
}
SEPARATOR = ":"  # after [USER] and [ASSISTANT]
_SPACES = re.compile(r"[ \t\r\f\v]+")

# Special tokens a document may carry between its text pieces (the template's and the grounding
# vocabulary's); the visual block tokens ([IMG], <image>, [VIDEO], ...) and <s> are placed by
# sequence assembly only.
DOCUMENT_TOKEN_IDS = frozenset({vocab.EOS_ID, vocab.USER_ID, vocab.ASSISTANT_ID}
                               | set(range(vocab.token_id("<grounding>"), vocab.EMU2_VOCAB_SIZE)))


def special_problem(token: int, kind: str):
    """Why a special segment ``token`` cannot be in a document of ``kind`` (None: it can): the
    template's and grounding tokens only, ``[USER]`` / ``[ASSISTANT]`` in conversations only."""
    if token not in DOCUMENT_TOKEN_IDS:
        return f"special segment {token} is not a template or grounding token"
    if token in (vocab.USER_ID, vocab.ASSISTANT_ID) and kind != "chat":
        return f"special segment {token} ([USER] / [ASSISTANT]) in a {kind} document, not a conversation"
    return None


@dataclass(frozen=True)
class Part:
    """One piece of a rendered conversation: ``kind`` "text" (a string, placeholders included)
    or "token" (a special token id); ``loss``: its tokens are cross-entropy targets."""

    kind: str
    value: object
    loss: bool


def system_message(name: str) -> str:
    """The text of ``short`` / ``detailed`` / ``none``; ``ValueError`` naming the choices."""
    try:
        return SYSTEM_MESSAGES[name]
    except KeyError:
        raise ValueError(f"system message {name!r}: choose from {sorted(SYSTEM_MESSAGES)}") from None


def normalize_text(text: str) -> str:
    """The one normalization of text pieces before tokenizing, in preprocessing (every text piece
    but a conversation's answers, kept as written) and in ``megatron-emu-generate --chat``, so a
    question tokenizes identically in both: strip, strip every line, collapse runs of horizontal
    whitespace to one space (newlines stay)."""
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.strip().splitlines())


def _question(text: str) -> list[Part]:
    return [Part("token", vocab.USER_ID, False), Part("text", f"{SEPARATOR} {text.strip()}", False)]


def conversation(turns: list[tuple[str, str]], system: str) -> list[Part]:
    """``turns``: ``("user" | "assistant", text)`` alternating, starting with the user and ending
    with an answer (``ValueError`` otherwise) -> the parts of the document, without ``<s>`` and the
    final ``</s>``."""
    roles = [r for r, _ in turns]
    if not turns or roles[-1] != "assistant" or any(
            r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise ValueError("a conversation alternates user and assistant turns, from the user to an answer")
    parts = [Part("text", system, False)] if system else []
    for i in range(0, len(turns), 2):
        question, answer = turns[i][1], turns[i + 1][1]
        if i:
            parts.append(Part("token", vocab.EOS_ID, True))  # closes the previous answer
        parts += _question(question)
        parts += [Part("token", vocab.ASSISTANT_ID, False), Part("text", SEPARATOR, False),
                  Part("text", answer.strip(), True)]
    return parts


def generation_prompt(question: str, system: str) -> list[Part]:
    """The parts of a one-turn prompt the model answers (``megatron-emu-generate --chat``):
    system message, ``[USER]: question``, ``[ASSISTANT]:``, after ``<s>``."""
    parts = [Part("text", system, False)] if system else []
    return parts + _question(question) + [Part("token", vocab.ASSISTANT_ID, False),
                                                Part("text", SEPARATOR, False)]
