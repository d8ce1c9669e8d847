"""Leakage probes: mismatched prompts, repetition rates, the linear prompt probe (synthetic tokens with known leakage)."""

from __future__ import annotations

import pytest
import torch

from diffperc.mllm.leakage import mismatched, prompt_probe, repetition_rates


def test_mismatched_never_equals_the_label_and_is_seeded():
    labels = torch.arange(100) % 10
    w = mismatched(labels, 10, seed=3)
    assert not (w == labels).any() and ((w >= 0) & (w < 10)).all()
    assert torch.equal(w, mismatched(labels, 10, seed=3)) and len(set(w.tolist())) == 10


def test_repetition_rates_count_exact_captions():
    gen = ["A photo of the digit seven.", "a photo of the digit one", "something else"]
    wrong = ["a photo of the digit seven", "a photo of the digit two", "a photo of the digit three"]
    true = ["a photo of the digit four", "a photo of the digit one", "a photo of the digit five"]
    r = repetition_rates(gen, wrong, true)
    assert r == pytest.approx({"repeats_mismatched": 1 / 3, "matches_true": 1 / 3})
    with pytest.raises(ValueError, match="as many"):
        repetition_rates(gen, wrong[:2], true)


def test_prompt_probe_finds_leaked_prompts_and_not_absent_ones():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(5, 8, generator=g)  # one direction per prompt
    p_tr, p_te = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (100,), generator=g)
    x_tr = torch.randn(200, 4, 8, generator=g) + codes[p_tr, None]  # (N, T, C) tokens carrying the prompt
    x_te = torch.randn(100, 4, 8, generator=g) + codes[p_te, None]
    leaked = prompt_probe(x_tr, p_tr, x_te, p_te)
    assert leaked["accuracy"] > 0.9
    clean = prompt_probe(torch.randn(200, 8, 2, 2, generator=g), p_tr, torch.randn(100, 8, 2, 2, generator=g), p_te)
    assert clean["accuracy"] < 0.45 and 0.2 <= clean["chance"] <= 0.4
