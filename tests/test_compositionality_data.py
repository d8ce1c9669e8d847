"""Compositional benchmark loaders on tiny copies of the released formats, metrics, error banks, weight fits."""

from __future__ import annotations

import random

import pytest
import torch
from compositionality_formats import (
    make_clevr,
    make_coco_order,
    make_cola,
    make_eqben,
    make_selfbench,
    make_sugarcrepe,
    make_vg,
    make_winoground,
)

from diffperc.data.compositional import (
    CompositionalDataModule,
    CompositionalDataset,
    CompositionalItem,
    load_task,
    order_perturbations,
    pre_caption,
)
from diffperc.zeroshot.compositional import ErrorBank, format_table, item_correct, task_metrics, write_table
from diffperc.zeroshot.compositional_weights import choice_accuracy, fit_timestep_weights


def _tagger(text):
    tags = {"small": "JJ", "green": "JJ", "brown": "JJ", "dog": "NN", "grass": "NN"}
    return [(w, tags.get(w.lower().strip("."), "DT")) for w in text.split()]


def test_winoground(tmp_path):
    items = load_task("winoground", make_winoground(tmp_path / "wino"))
    assert [it.kind for it in items] == ["group"] * 3
    assert items[1].subtask == "Relation" and items[1].captions == ["a mug on a box 1", "a box on a mug 1"]
    assert [p.name for p in items[2].images] == ["ex_2_img_0.png", "ex_2_img_1.png"]
    assert len(load_task("winoground", tmp_path / "wino", subtask="Both")) == 1
    ds = CompositionalDataset(items, image_size=16)
    x = ds[0]["images"]
    assert x.shape == (2, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert abs(x[1].mean() - x[0].mean()) > 0.01  # the two images differ


def test_vg_and_crop(tmp_path):
    rel = load_task("vg_relation", make_vg(tmp_path / "aro"))
    att = load_task("vg_attribution", make_vg(tmp_path / "aro", "attribution"))
    assert rel[0].captions[0].startswith("the horse") and rel[0].label == 0 and rel[0].crop == (2, 1, 16, 12)
    assert att[0].meta["group"] == "white_large" and att[0].subtask == "vg_attribution"
    from diffperc.data.compositional import load_image

    assert load_image(rel[0].images[0], rel[0].crop).size == (16, 12)


def test_coco_order_perturbations(tmp_path):
    items = load_task("coco_order", make_coco_order(tmp_path / "coco"), tagger=_tagger)
    assert len(items) == 2 and all(len(it.captions) == 5 and it.label == 0 for it in items)
    assert items[0].captions[0] == "a small dog runs on the green grass"  # ARO pre_caption
    negs = order_perturbations("A small dog runs on the green grass", _tagger, random.Random(0))
    for neg in negs:  # every perturbation is a permutation of the same words
        assert sorted(neg.split()) == sorted("A small dog runs on the green grass".split())
    words = negs[0].split()
    assert {words[2], words[7]} == {"dog", "grass"} and words[3] == "runs"  # nouns swapped among themselves only
    assert pre_caption("A  Dog; (running)!", 2) == "a dog"


def test_sugarcrepe_cola_eqben_clevr(tmp_path):
    sc = load_task("sugarcrepe", make_sugarcrepe(tmp_path / "sc"), subtask="swap_att")
    assert [it.captions for it in sc][0] == ["a red car and a blue bike", "a blue car and a red bike"]
    cola = load_task("cola", make_cola(tmp_path / "cola"))
    assert cola[0].kind == "group" and [p.name for p in cola[0].images] == ["1.jpg", "2.jpg"]
    eq = load_task("eqben", make_eqben(tmp_path / "eq"))
    assert [it.subtask for it in eq] == ["eqbenag", "eqbensd"]
    assert len(load_task("eqben", tmp_path / "eq", subtask="eqbensd")) == 1
    img = CompositionalDataset(eq, 8)[1]["images"]  # .npy BGR -> RGB: image 0 is blue
    assert img[0, 2].mean() > 0.9 and img[0, 0].mean() < 0.1 and img[1, 0].mean() > 0.9
    clevr = load_task("clevr", make_clevr(tmp_path / "clevr"))
    assert len(clevr) == 7
    spatial = [it for it in clevr if it.subtask == "spatial"][0]
    assert spatial.captions == ["spatial wrong", "spatial correct"] and spatial.label == 0  # released swap


def test_selfbench(tmp_path):
    root = make_selfbench(tmp_path / "geneval" / "outputs")
    colors = load_task("selfbench", root, subtask="colors", model="3-m")
    assert len(colors) == 2 and colors[0].captions[colors[0].label] == "a photo of a blue car"
    pos = load_task("selfbench", root, subtask="position", model="3-m")[0]
    assert pos.captions[pos.label] == "a photo of a dog right of a cat" and len(pos.captions) == 3
    ca = load_task("selfbench", root, subtask="color_attr", model="stable-diffusion-3-medium-diffusers")[0]
    assert len(ca.captions) == 9 and ca.captions[ca.label] == "a photo of a green car and a red bike"
    with pytest.raises(ValueError, match="no Self-Bench images with tag 'counting'"):
        load_task("selfbench", root, subtask="counting", model="3-m")


def test_bad_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="examples.jsonl"):
        load_task("winoground", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"visual_genome_relation\.json"):
        load_task("vg_relation", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="captions/<subtask>.json"):
        load_task("clevr", tmp_path / "empty", subtask="spatial")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("cola", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown compositionality task"):
        load_task("winogrand", tmp_path)
    with pytest.raises(ValueError, match="needs 1 image and >= 2 captions"):
        CompositionalItem(["a.png"], ["only one caption"], 0)
    with pytest.raises(ValueError, match="SugarCrepe subtask"):
        load_task("sugarcrepe", tmp_path / "empty", subtask="add")


def test_datamodule_batches(tmp_path):
    dm = CompositionalDataModule("clevr", str(make_clevr(tmp_path / "c")), image_size=16, limit=3, batch_size=2)
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [2, 1] and batches[0][0]["images"].shape == (1, 3, 16, 16)


def _bank() -> ErrorBank:
    """Two timesteps: t0 tells the truth, t1 lies (and dominates the uniform mean)."""
    bank = ErrorBank()
    ts = torch.tensor([100, 900])
    for i in range(6):
        e = torch.tensor([[[1.0, 5.0]], [[2.0, 3.0]]])  # (C=2, M=1, S=2): right caption 0 on t0, caption 1 overall
        bank.add(e, None, 0, "text", "a" if i < 3 else "b", str(i), ts)
    g = torch.zeros(2, 2, 2)
    g[0, 0], g[1, 1], g[0, 1], g[1, 0] = 1.0, 1.0, 2.0, 2.0  # each caption prefers its image: all correct
    bank.add(g, torch.tensor([[0.0, 0.0], [5.0, 5.0]]), 0, "group", "wino", "g", ts)
    return bank


def test_metrics_and_bank_roundtrip(tmp_path):
    bank = _bank()
    m = task_metrics(bank)
    assert m["a"]["acc"] == 0.0 and m["wino"] == {"group": 100.0, "image": 100.0, "text": 100.0, "n": 1.0}
    assert task_metrics(bank, weights=torch.tensor([1.0, 0.0]))["all"]["acc"] == 100.0
    # normalising by the unconditional errors flips the image score of the 2x2 item (image 1 is a priori bad)
    assert task_metrics(bank, normalize=True)["wino"]["image"] == 0.0
    assert item_correct(torch.ones(2, 1, 3), None, 0, "text")["acc"] == 0.0  # a tie is wrong
    path = bank.save(tmp_path / "errors.pt")
    back = ErrorBank.load(path)
    assert len(back) == 7 and torch.equal(back.errors[6], bank.errors[6]) and back.uncond[0] is None
    assert torch.equal(back.timesteps, torch.tensor([100, 900]))
    csv_path, md_path = write_table({"clevr": m}, tmp_path / "table")
    assert csv_path.read_text().splitlines()[0] == "task,subtask,acc,text,image,group,n"
    assert "| clevr | wino |  | 100.00 | 100.00 | 100.00 | 1 |" in md_path.read_text()
    assert format_table({"x": m}) == md_path.read_text().replace("clevr", "x")


def test_weight_fit_recovers_informative_timestep():
    g = torch.Generator().manual_seed(0)
    N, K, S = 60, 3, 8
    labels = torch.randint(0, K, (N,), generator=g)
    errors = torch.rand(N, K, S, generator=g) + 1.0
    errors[torch.arange(N), labels, 2] -= 0.8  # only timestep 2 knows the answer
    errors[torch.arange(N), (labels + 1) % K, 5:] -= 0.3  # the late ones prefer a wrong caption
    before = choice_accuracy(errors[:30], labels[:30])
    fit = fit_timestep_weights(errors[:30], labels[:30], steps=300, lr=0.05)
    assert fit.mode == "per_timestep" and fit.weights.argmax() == 2 and fit.weights.mean().item() == pytest.approx(1)
    held = choice_accuracy(errors[30:], labels[30:], fit.weights)
    assert held > choice_accuracy(errors[30:], labels[30:]) + 20 and fit.fit_accuracy >= before
    with pytest.warns(UserWarning, match="regularised by fitting a degree-3 polynomial"):
        poly = fit_timestep_weights(errors[:5], labels[:5], steps=50)
    assert poly.mode == "polynomial" and poly.degree == 3 and "5 items < 8 timesteps" in poly.note
    with pytest.raises(ValueError, match="refusing to fit 8 free timestep weights on 5 items"):
        fit_timestep_weights(errors[:5], labels[:5], mode="per_timestep")
    assert fit_timestep_weights(errors[:5], labels[:5], mode="per_timestep", l2=1.0, steps=5).mode == "per_timestep"
    with pytest.raises(ValueError, match="labels must be"):
        fit_timestep_weights(errors[:5], labels[:4])


def test_choice_matrix_pads_and_splits():
    bank = _bank()
    bank.add(torch.rand(3, 1, 2), None, 2, "text", "c", "k3", bank.timesteps)
    errs, labels = bank.choice_matrix()
    assert errs.shape == (6 + 4 + 1, 3, 2) and torch.isnan(errs[0, 2]).all() and labels[-1] == 2
    assert choice_accuracy(errs[:6], labels[:6]) == 0.0
    assert len(bank.subset([0, 6])) == 2
