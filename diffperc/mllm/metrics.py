"""Benchmark metrics: MMVP (paired multiple choice, scored per pair) and GQA (exact-match accuracy).

MMVP (Tong et al., "Eyes Wide Shut?", CVPR 2024, arXiv 2401.06209; github tsb0601/MMVP): 300
questions in 150 pairs, rows (1, 2), (3, 4), ... of ``Questions.csv``; a pair counts only when
both of its questions are answered correctly (scripts/gpt_grader.py counts ``round_correct == 2``
every two rows). The released grader asks GPT-4 whether the response answers correctly; offline,
:func:`mmvp_correct` grades by rule instead: the chosen option letter ("(a)", "a", "A.", "option
b") or the option's text, when exactly one option is named.

GQA (Hudson & Manning, CVPR 2019): accuracy = exact match of the prediction with the answer,
after LLaVA's conversion (scripts/convert_gqa_for_eval.py: ``text.rstrip('.').lower()``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["gqa_accuracy", "mmvp_correct", "mmvp_scores", "parse_options"]


def parse_options(options: str) -> list[str]:
    """``"(a) Open (b) Closed"`` -> ``["Open", "Closed"]``."""
    parts = re.split(r"\(([a-z])\)", options.strip(), flags=re.IGNORECASE)
    return [p.strip() for p in parts[2::2]]


def _letter(answer: str) -> str:
    m = re.search(r"\(?([a-z])\)?", answer.strip().lower())
    if not m:
        raise ValueError(f"MMVP correct answer must name an option like '(a)', got {answer!r}")
    return m.group(1)


def mmvp_correct(response: str, options: str, answer: str) -> bool:
    """Whether a free-form response picks the correct option (rule-based stand-in for the GPT-4 grader)."""
    text = response.strip().lower()
    letters = [chr(ord("a") + i) for i in range(len(parse_options(options)))]
    want = _letter(answer)
    patterns = [r"^\(?([a-z])\)?(?:[\s.:,)]|$)", r"\(([a-z])\)", r"(?:option|answer is)\s*\(?([a-z])\b"]
    for pat in patterns:
        found = {m for m in re.findall(pat, text) if m in letters}
        if len(found) == 1:
            return found.pop() == want
    named = [letter for letter, opt in zip(letters, parse_options(options), strict=True)
             if re.search(r"\b" + re.escape(opt.lower()) + r"\b", text)]
    return len(named) == 1 and named[0] == want


def mmvp_scores(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"pair_accuracy", "question_accuracy", "pairs"}`` from records with ``question_id`` (the CSV's 1-based
    Index) and ``correct``; pairs are (1, 2), (3, 4), ... and an incomplete pair is an error."""
    by_id = {int(r["question_id"]): bool(r["correct"]) for r in records}
    if not by_id:
        raise ValueError("no MMVP records to score")
    pairs = sorted({(i - 1) // 2 for i in by_id})
    missing = [2 * p + k for p in pairs for k in (1, 2) if 2 * p + k not in by_id]
    if missing:
        raise ValueError(f"MMVP is scored per pair; questions {missing[:6]} of the pairs are missing")
    both = sum(by_id[2 * p + 1] and by_id[2 * p + 2] for p in pairs)
    return {"pair_accuracy": both / len(pairs), "question_accuracy": sum(by_id.values()) / len(by_id),
            "pairs": float(len(pairs))}


def gqa_accuracy(records: Sequence[dict[str, Any]]) -> float:
    """Exact-match accuracy of ``response`` vs ``answer`` after ``rstrip('.').lower()`` (LLaVA's GQA conversion)."""
    if not records:
        raise ValueError("no GQA records to score")
    hits = [r["response"].strip().rstrip(".").lower() == str(r["answer"]).strip().lower() for r in records]
    return sum(hits) / len(hits)
