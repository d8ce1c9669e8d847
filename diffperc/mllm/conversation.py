"""LLaVA conversation formats, ``<image>`` token splicing and label masking (written from LLaVA's behaviour).

LLaVA's data is JSON: ``[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}, ...]}]`` (github haotian-liu/LLaVA, llava/train/train.py). Two formats:

- ``"plain"`` (stage 1, projector pre-training; ``conv_llava_plain``): the text is
  ``<image>`` + caption + ``"\\n"``; only caption and separator are trained.
- ``"vicuna_v1"`` (stage 2 and evaluation; ``conv_vicuna_v1``): ``SYSTEM + " USER: <image>\\nQ
  ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"``; the answers and their ``</s>`` are trained, the rest
  masked with -100. As in LLaVA's ``preprocess_multimodal``, ``<image>`` is moved to the front of
  its message followed by a newline.

Instead of LLaVA's token-count arithmetic on the whole string, each piece is tokenized on its own
(without special tokens) and the pieces are joined, so labels line up by construction for any
tokenizer; the answer piece starts with the space (``ASSISTANT:`` then ``" A</s>"``) so a
generation prompt ending in ``ASSISTANT:`` is a prefix of the training text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FORMATS", "IGNORE_INDEX", "IMAGE_TOKEN", "IMAGE_TOKEN_INDEX", "VICUNA_SYSTEM", "first_question",
           "generation_prompt", "render", "tokenize_pieces", "tokenize_conversation"]

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"
FORMATS = ("plain", "vicuna_v1")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def _check(conversation: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    turns = list(conversation)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]  # LLaVA skips a leading non-human turn
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"a conversation needs human/gpt turn pairs, got {len(turns)} turns: {conversation!r}")
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be {{'from': {want!r}, 'value': str}}, got {turn!r}")
    return turns


def _image_first(text: str) -> str:
    if IMAGE_TOKEN not in text:
        return text
    return IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()


def first_question(conversation: Sequence[dict[str, str]]) -> str:
    """The first human message without the image token: Mustafar's diffusion prompt."""
    return _check(conversation)[0]["value"].replace(IMAGE_TOKEN, "").strip()


def render(conversation: Sequence[dict[str, str]], fmt: str = "vicuna_v1", eos: str = "</s>") -> list[tuple[str, bool]]:
    """A LLaVA conversation as text pieces ``(text, trained)`` in order.

    Args:
        conversation: ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]``.
        fmt: ``"plain"`` or ``"vicuna_v1"``.
        eos: the end-of-answer separator (LLaVA: ``"</s>"``; use the LM's eos token).
    """
    turns = _check(conversation)
    if fmt == "plain":
        if len(turns) != 2 or IMAGE_TOKEN not in turns[0]["value"]:
            raise ValueError("the 'plain' format (stage 1) needs one human turn with <image> and one caption turn")
        return [(IMAGE_TOKEN, False), (turns[1]["value"] + "\n", True)]
    if fmt != "vicuna_v1":
        raise ValueError(f"conversation format must be one of {FORMATS}, got {fmt!r}")
    pieces: list[tuple[str, bool]] = []
    for i in range(0, len(turns), 2):
        head = VICUNA_SYSTEM + " " if i == 0 else ""
        pieces.append((f"{head}USER: {_image_first(turns[i]['value'])} ASSISTANT:", False))
        pieces.append((" " + turns[i + 1]["value"] + eos, True))
    return pieces


def generation_prompt(question: str, fmt: str = "vicuna_v1", image: bool = True) -> str:
    """The text before the answer, as LLaVA builds it for evaluation (ends with ``ASSISTANT:``)."""
    if fmt == "plain":
        return IMAGE_TOKEN
    q = _image_first(IMAGE_TOKEN + "\n" + question) if image and IMAGE_TOKEN not in question else _image_first(question)
    return f"{VICUNA_SYSTEM} USER: {q} ASSISTANT:"


def _ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a text with ``<image>`` placeholders as IMAGE_TOKEN_INDEX (no special tokens added)."""
    out: list[int] = []
    for j, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if j:
            out.append(IMAGE_TOKEN_INDEX)
        if chunk:
            out.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return out


def tokenize_pieces(pieces: Sequence[tuple[str, bool]], tokenizer: Any, add_bos: bool = True) -> tuple[Tensor, Tensor]:
    """Pieces -> input_ids (T,) with IMAGE_TOKEN_INDEX placeholders, labels (T,) with -100 where masked."""
    ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trained in pieces:
        piece = _ids(text, tokenizer)
        ids.extend(piece)
        labels.extend(t if trained and t != IMAGE_TOKEN_INDEX else IGNORE_INDEX for t in piece)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def tokenize_conversation(conversation: Sequence[dict[str, str]], tokenizer: Any, fmt: str = "vicuna_v1",
                          add_bos: bool = True) -> tuple[Tensor, Tensor]:
    """``render`` then ``tokenize_pieces`` with the tokenizer's eos token as the answer separator."""
    eos = tokenizer.eos_token or "</s>"
    return tokenize_pieces(render(conversation, fmt, eos), tokenizer, add_bos)
