"""Compositional image-text benchmarks in their released on-disk formats, as (images, captions, label) items.

The loaders follow ``datasets_loading.py`` and ``aro/dataset_zoo`` of Jeong et al.'s released code
(eugene6923/Diffusion-Classifiers-Compositionality, NeurIPS 2025 D&B). Every benchmark becomes a
list of :class:`CompositionalItem`:

- ``kind="text"``: one image, K >= 2 candidate captions, ``label`` = the right caption
  (ARO VG-Relation / VG-Attribution / COCO-Order, SugarCrepe, CLEVR, Self-Bench);
- ``kind="image"``: one caption, K >= 2 candidate images, ``label`` = the right image;
- ``kind="group"``: Winoground-style 2 images x 2 captions, caption i belongs to image i
  (Winoground, CoLA multi-object, EqBen); scored with text, image and group scores.

Layouts (root = the folder given as ``root``):

==================  ==========================================================================
winoground          ``examples.jsonl`` (HF facebook/winoground ``data/``) + ``images/ex_<id>_img_<j>.png``
vg_relation         ``visual_genome_relation.json`` + ``images/`` (ARO; bbox crop)
vg_attribution      ``visual_genome_attribution.json`` + ``images/``
coco_order          ``coco_karpathy_test.json`` + the COCO images it names (``val2014/...``)
sugarcrepe          ``<subset>.json`` (sugar-crepe ``data/``) + ``image_root`` = COCO ``val2017/``
cola                ``COLA_multiobjects_matching_benchmark.json`` + ``image_root`` (GQA images)
eqben               ``all_select.json`` + ``images/`` (the released EqBen subset)
clevr               ``captions/<subtask>.json`` + ``images/``
selfbench           ``<cfg>/<model>/<NNNNN>/metadata.jsonl`` + ``samples/*.png`` and ``prompts/zero_shot_prompts.json``
==================  ==========================================================================
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["CLEVR_SUBTASKS", "SELFBENCH_TAGS", "SUGARCREPE_SUBSETS", "TASKS", "CompositionalDataModule",
           "CompositionalDataset", "CompositionalItem", "load_task"]

KINDS = ("text", "image", "group")
CLEVR_SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
                  "binding_color_shape", "binding_shape_color")
SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
SELFBENCH_TAGS = ("colors", "color_attr", "position", "counting", "single_object", "two_object")
SELFBENCH_MODELS = {"1.5": "stable-diffusion-v1-5", "2.0": "stable-diffusion-2-base",
                    "3-m": "stable-diffusion-3-medium-diffusers", "flux": "FLUX.1-dev"}


@dataclass
class CompositionalItem:
    """One test item. ``images``: paths (or PIL images); ``crop``: (x, y, w, h) box to cut first (ARO)."""

    images: list[Any]
    captions: list[str]
    label: int
    kind: str = "text"
    subtask: str = ""
    id: str = ""
    crop: tuple[float, float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"item {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        n_img, n_cap = len(self.images), len(self.captions)
        if self.kind == "text" and (n_img != 1 or n_cap < 2):
            raise ValueError(f"item {self.id!r}: a text-choice item needs 1 image and >= 2 captions, got "
                             f"{n_img} image(s) and {n_cap} caption(s) {self.captions!r}")
        if self.kind == "image" and (n_cap != 1 or n_img < 2):
            raise ValueError(f"item {self.id!r}: an image-choice item needs 1 caption and >= 2 images, got "
                             f"{n_cap} caption(s) and {n_img} image(s)")
        if self.kind == "group" and (n_img != 2 or n_cap != 2):
            raise ValueError(f"item {self.id!r}: a Winoground-style item needs 2 images and 2 captions, got "
                             f"{n_img} and {n_cap}")
        if not all(isinstance(c, str) and c.strip() for c in self.captions):
            raise ValueError(f"item {self.id!r}: captions must be non-empty strings, got {self.captions!r}")
        n = n_cap if self.kind == "text" else n_img
        if self.kind != "group" and not 0 <= self.label < n:
            raise ValueError(f"item {self.id!r}: label {self.label} is not an index into its {n} candidates")


# ---------------------------------------------------------------------------- helpers
def _need(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found ({what}); expected layout: {layout}")
    return path


def _json(path: Path, layout: str) -> Any:
    _need(path, "annotation file", layout)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected layout: {layout}") from None


def load_image(path: Any, crop: Sequence[float] | None = None) -> Any:
    """A PIL RGB image from a path (``.npy``: a BGR uint8 array, as EqBen ships some) or a PIL image."""
    from PIL import Image

    if isinstance(path, Image.Image):
        img = path.convert("RGB")
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"image {path} not found")
        img = Image.fromarray(np.load(path)[:, :, [2, 1, 0]], "RGB") if path.suffix == ".npy" else \
            Image.open(path).convert("RGB")
    if crop is not None:
        x, y, w, h = crop
        img = img.crop((x, y, x + w, y + h))
    return img


# ---------------------------------------------------------------------------- loaders
_WINO = "root/examples.jsonl (one JSON object per line: id, caption_0, caption_1, collapsed_tag) + root/images/ex_<id>_img_<0|1>.png"


def load_winoground(root: str | Path, subtask: str | None = None) -> list[CompositionalItem]:
    """Winoground (HF facebook/winoground: ``data/examples.jsonl`` + ``images.zip`` unpacked to ``images/``).

    ``subtask``: a ``collapsed_tag`` ("Object", "Relation", "Both") to keep only those, as the
    released ``winoground_relation`` etc. tasks.
    """
    root = Path(root)
    jsonl = root / "examples.jsonl" if (root / "examples.jsonl").exists() else root / "data" / "examples.jsonl"
    _need(jsonl, "Winoground examples", _WINO)
    img_dir = jsonl.parent / "images" if (jsonl.parent / "images").is_dir() else root / "images"
    items = []
    for line_no, line in enumerate(jsonl.read_text().splitlines()):
        if not line.strip():
            continue
        ex = json.loads(line)
        missing = [k for k in ("id", "caption_0", "caption_1") if k not in ex]
        if missing:
            raise ValueError(f"{jsonl} line {line_no + 1} lacks {missing}; expected layout: {_WINO}")
        tag = ex.get("collapsed_tag", "")
        if subtask is not None and tag != subtask:
            continue
        names = [ex.get(f"image_{j}", f"ex_{ex['id']}_img_{j}") for j in (0, 1)]
        paths = [_need(img_dir / f"{n}.png", "Winoground image", _WINO) for n in names]
        items.append(CompositionalItem(paths, [ex["caption_0"], ex["caption_1"]], 0, "group", tag or "winoground",
                                       str(ex["id"])))
    return items


_ARO = "root/visual_genome_{relation|attribution}.json (image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption, false_caption) + root/images/"


def _load_vg(root: str | Path, name: str) -> list[CompositionalItem]:
    root = Path(root)
    data = _json(root / f"visual_genome_{name}.json", _ARO)
    img_dir = _need(root / "images", "image folder", _ARO)
    items = []
    for i, ex in enumerate(data):
        crop = (ex["bbox_x"], ex["bbox_y"], ex["bbox_w"], ex["bbox_h"])
        sub = ex.get("relation_name") if name == "relation" else "_".join(ex.get("attributes", []))
        # released order: [true_caption, false_caption], correct index 0 (aro_datasets.py __getitem__)
        items.append(CompositionalItem([img_dir / ex["image_path"]], [ex["true_caption"], ex["false_caption"]], 0,
                                       "text", f"vg_{name}", str(i), crop=crop, meta={"group": sub}))
    return items


def load_vg_relation(root: str | Path) -> list[CompositionalItem]:
    """ARO VG-Relation (23,937 items in the release): the bbox crop, [true, false] caption."""
    return _load_vg(root, "relation")


def load_vg_attribution(root: str | Path) -> list[CompositionalItem]:
    """ARO VG-Attribution (28,748 items): the bbox crop, [true, false] caption."""
    return _load_vg(root, "attribution")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ARO's caption cleaning (dataset_zoo/retrieval.py): lower-case, drop .!"()*#:;~, squeeze spaces, cut words."""
    caption = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", caption.lower())).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


_NOUN, _ADJ = ("NN", "NNS", "NNP", "NNPS"), ("JJ", "JJR", "JJS")


def spacy_tagger() -> Callable[[str], list[tuple[str, str]]]:
    """(token, Penn tag) pairs from spaCy's ``en_core_web_sm``, the tagger ARO's TextShuffler uses."""
    try:
        import spacy

        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError) as err:
        raise ImportError("COCO-Order's perturbations need a POS tagger: pip install spacy && python -m spacy "
                          "download en_core_web_sm, or pass tagger=callable(text) -> [(token, tag), ...]") from err
    return lambda text: [(t.text, t.tag_) for t in nlp(text)]


def order_perturbations(caption: str, tagger: Callable[[str], list[tuple[str, str]]],
                        rng: random.Random) -> list[str]:
    """ARO's four COCO-Order negatives (perturbations.py TextShuffler): shuffle nouns and adjectives, all
    but nouns and adjectives, within trigrams, and the trigrams. Tokens are the tagger's (ARO: spaCy for
    the first two, nltk.word_tokenize for the trigram ones)."""
    tagged = tagger(caption)
    tokens = [t for t, _ in tagged]

    def permute(toks: list[str], idx: list[int]) -> list[str]:
        out, vals = list(toks), [toks[i] for i in idx]
        rng.shuffle(vals)
        for i, v in zip(idx, vals, strict=True):
            out[i] = v
        return out

    nouns = [i for i, (_, g) in enumerate(tagged) if g in _NOUN]
    adjs = [i for i, (_, g) in enumerate(tagged) if g in _ADJ]
    rest = [i for i, (_, g) in enumerate(tagged) if g not in _NOUN + _ADJ]
    a = permute(permute(tokens, nouns), adjs)
    b = permute(tokens, rest)
    trigrams = [tokens[i : i + 3] for i in range(0, len(tokens), 3)]
    within = [rng.sample(tri, len(tri)) for tri in trigrams]
    across = list(trigrams)
    rng.shuffle(across)
    return [" ".join(a), " ".join(b), " ".join(w for tri in within for w in tri),
            " ".join(w for tri in across for w in tri)]


_COCO = "root/coco_karpathy_test.json (list of {image: 'val2014/COCO_val2014_....jpg', caption: [...]}) + the images under root"


def load_coco_order(root: str | Path, split: str = "test", tagger: Callable[[str], list[tuple[str, str]]] | None = None,
                    seed: int = 0, max_words: int = 30) -> list[CompositionalItem]:
    """ARO COCO-Order: each Karpathy-split caption against its 4 word-order perturbations (correct = 0).

    The released code perturbs with unseeded global RNGs; here ``seed`` fixes them.
    """
    root = Path(root)
    data = _json(root / f"coco_karpathy_{split}.json", _COCO)
    tagger = tagger or spacy_tagger()
    rng = random.Random(seed)
    items = []
    for ann in data:
        for j, cap in enumerate(ann["caption"]):
            caps = [pre_caption(cap, max_words)] + [pre_caption(p, max_words) for p in order_perturbations(cap, tagger, rng)]
            items.append(CompositionalItem([root / ann["image"]], caps, 0, "text", "coco_order", f"{ann['image']}#{j}"))
    return items


_SUGAR = "root/<subset>.json ({'0': {filename, caption, negative_caption}, ...}, sugar-crepe data/) + image_root = COCO val2017/"


def load_sugarcrepe(root: str | Path, subtask: str = "add_att", image_root: str | Path | None = None) -> list[CompositionalItem]:
    """SugarCrepe: one of add_att/add_obj/replace_att/replace_obj/replace_rel/swap_att/swap_obj.

    ``image_root`` default ``root/val2017``. (The released loader maps swap_obj item 108 to 109; all are kept here.)
    """
    if subtask not in SUGARCREPE_SUBSETS:
        raise ValueError(f"SugarCrepe subtask must be one of {SUGARCREPE_SUBSETS}, got {subtask!r}")
    root = Path(root)
    data = _json(root / f"{subtask}.json", _SUGAR)
    image_root = Path(image_root) if image_root else root / "val2017"
    return [CompositionalItem([image_root / row["filename"]], [row["caption"], row["negative_caption"]], 0, "text",
                              subtask, str(k)) for k, row in data.items()]


_COLA = "root/COLA_multiobjects_matching_benchmark.json (list of [image0, caption0, image1, caption1]) + image_root (GQA images)"


def load_cola(root: str | Path, image_root: str | Path | None = None) -> list[CompositionalItem]:
    """CoLA multi-object matching (Winoground-style; images by file name in ``image_root``, default ``root/images``)."""
    root = Path(root)
    data = _json(root / "COLA_multiobjects_matching_benchmark.json", _COLA)
    image_root = Path(image_root) if image_root else root / "images"
    items = []
    for i, ex in enumerate(data):
        if len(ex) < 4:
            raise ValueError(f"CoLA entry {i} has {len(ex)} fields; expected layout: {_COLA}")
        paths = [image_root / Path(ex[0]).name, image_root / Path(ex[2]).name]
        items.append(CompositionalItem(paths, [ex[1], ex[3]], 0, "group", "cola_multi", str(i)))
    return items


_EQBEN = "root/all_select.json (list of {image0, image1, caption0, caption1}) + root/images/<image0>"
EQBEN_SUBSETS = ("eqbenyoucook2", "eqbengebc", "eqbenag", "eqbenkubric_attr", "eqbenkubric_cnt", "eqbenkubric_loc",
                 "eqbensd")


def load_eqben(root: str | Path, subtask: str | None = None) -> list[CompositionalItem]:
    """The EqBen subset the released code evaluates (``eqbench_subset``); ``subtask`` filters by source folder."""
    root = Path(root)
    data = _json(root / "all_select.json", _EQBEN)
    if subtask is not None and subtask not in EQBEN_SUBSETS:
        raise ValueError(f"EqBen subtask must be one of {EQBEN_SUBSETS}, got {subtask!r}")
    items = []
    for i, ex in enumerate(data):
        sub = next((s for s in EQBEN_SUBSETS if s in ex["image0"]), "eqben")
        if subtask is not None and subtask not in ex["image0"]:
            continue
        items.append(CompositionalItem([root / "images" / ex["image0"], root / "images" / ex["image1"]],
                                       [ex["caption0"], ex["caption1"]], 0, "group", sub, str(i)))
    return items


_CLEVR = "root/captions/<subtask>.json ({image_name: [[correct, wrong], ...]}) + root/images/<image_name>"


def load_clevr(root: str | Path, subtask: str | None = None) -> list[CompositionalItem]:
    """The CLEVR binding/recognition/spatial tasks; None loads all seven. In ``spatial`` the second caption
    of each pair is the correct one (the released loader swaps it first)."""
    root = Path(root)
    subtasks = CLEVR_SUBTASKS if subtask is None else (subtask,)
    if subtask is not None and subtask not in CLEVR_SUBTASKS:
        raise ValueError(f"CLEVR subtask must be one of {CLEVR_SUBTASKS}, got {subtask!r}")
    items = []
    for sub in subtasks:
        for img, pairs in _json(root / "captions" / f"{sub}.json", _CLEVR).items():
            for j, pair in enumerate(pairs):
                caps = [pair[1], pair[0]] if sub == "spatial" else [pair[0], pair[1]]
                items.append(CompositionalItem([root / "images" / img], caps, 0, "text", sub, f"{img}#{j}"))
    return items


_SELF = ("root/<cfg>/<model>/<NNNNN>/metadata.jsonl ({tag, prompt, include}) + samples/<k>.png, and "
         "prompts/zero_shot_prompts.json in root or beside it ({domain: {tag: candidates}})")


def selfbench_candidates(prompts: dict[str, Any], tag: str, include: list[dict[str, Any]]) -> list[str]:
    """The candidate captions of a Self-Bench image (released ``Geneval_final.__getitem__``)."""
    if tag not in prompts:
        raise ValueError(f"zero_shot_prompts.json has no tag {tag!r} (has {sorted(prompts)})")
    text = prompts[tag]
    if isinstance(text, list):
        return text
    if tag == "color_attr":
        return text[include[0]["class"]][include[1]["class"]]
    if tag == "position":
        return text[include[1]["class"]][include[0]["class"]]
    return text[include[0]["class"]]


def load_selfbench(root: str | Path, subtask: str = "colors", model: str = "3-m", cfg: float | str = 9.0,
                   domain: str = "photo", filter_file: str | Path | None = None) -> list[CompositionalItem]:
    """Self-Bench (released ``Geneval_final``; HF eugene6923/Self-Bench) or one :mod:`selfbench` generated.

    Args:
        root: the folder holding ``<cfg>/`` (the released ``geneval/outputs``).
        subtask: the GenEval tag (colors, color_attr, position, counting, single_object, two_object, or a
            custom tag a generated Self-Bench uses).
        model: a model folder name, or a released version key ("1.5", "2.0", "3-m", "flux").
        cfg: guidance scale folder (9.0 as released).
        filter_file: optional human filter JSON (``filter/SD-<version>-CFG=<cfg>.json``): keep only
            samples every label marks ``original_good``.
    """
    root = Path(root)
    folder = root / f"{float(cfg)}" / SELFBENCH_MODELS.get(model, model)
    _need(folder, "Self-Bench model folder", _SELF)
    prompts_file = next((p for p in (root / "prompts" / "zero_shot_prompts.json",
                                     root.parent / "prompts" / "zero_shot_prompts.json") if p.exists()), None)
    if prompts_file is None:
        raise FileNotFoundError(f"zero_shot_prompts.json not found in {root / 'prompts'} or {root.parent / 'prompts'}; "
                                f"expected layout: {_SELF}")
    prompts = _json(prompts_file, _SELF)
    if domain not in prompts:
        raise ValueError(f"{prompts_file} has no domain {domain!r} (has {sorted(prompts)})")
    prompts = prompts[domain]
    keep = None
    if filter_file is not None:
        keep = {"/".join(Path(e["sample_path"]).parts[-4:]) for e in _json(Path(filter_file), _SELF)
                if all(lab.get("label") == "original_good" for lab in e.get("labels", [{"label": e.get("human_label")}]))}
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        meta = _json(sub / "metadata.jsonl", _SELF)
        if meta.get("tag") != subtask:
            continue
        cands = selfbench_candidates(prompts, subtask, meta.get("include", []))
        if meta["prompt"] not in cands:
            raise ValueError(f"{sub / 'metadata.jsonl'}: prompt {meta['prompt']!r} is not among its {len(cands)} "
                             f"candidate captions in {prompts_file}")
        for png in sorted((sub / "samples").glob("*.png")):
            if keep is not None and "/".join(png.parts[-4:]) not in keep:
                continue
            items.append(CompositionalItem([png], list(cands), cands.index(meta["prompt"]), "text", subtask,
                                           f"{sub.name}/{png.stem}"))
    if not items:
        raise ValueError(f"no Self-Bench images with tag {subtask!r} under {folder}; expected layout: {_SELF}")
    return items


TASKS: dict[str, Callable[..., list[CompositionalItem]]] = {
    "winoground": load_winoground, "vg_relation": load_vg_relation, "vg_attribution": load_vg_attribution,
    "coco_order": load_coco_order, "sugarcrepe": load_sugarcrepe, "cola": load_cola, "eqben": load_eqben,
    "clevr": load_clevr, "selfbench": load_selfbench,
}


def load_task(task: str, root: str | Path, **kwargs: Any) -> list[CompositionalItem]:
    """Items of a benchmark by name (see :data:`TASKS`); ``kwargs`` go to its loader."""
    if task not in TASKS:
        raise ValueError(f"unknown compositionality task {task!r}; known: {', '.join(TASKS)}")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{task} root {root} does not exist; see diffperc/data/compositional.py for the layout")
    return TASKS[task](root, **kwargs)


# ---------------------------------------------------------------------------- torch side
class CompositionalDataset(Dataset):
    """Items with their images loaded: {"images": (M, 3, S, S) in [0, 1], "captions", "label", "kind", "subtask", "id"}.

    Images are resized to ``image_size`` squared (PIL bicubic), as the released loaders (``img.resize``).
    """

    def __init__(self, items: Sequence[CompositionalItem], image_size: int = 512) -> None:
        self.items, self.image_size = list(items), int(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        it = self.items[i]
        ims = [load_image(p, it.crop).resize((self.image_size,) * 2, Image.BICUBIC) for p in it.images]
        arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in ims])  # (M, S, S, 3)
        images: Tensor = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        return {"images": images, "captions": list(it.captions), "label": it.label, "kind": it.kind,
                "subtask": it.subtask, "id": it.id}


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class CompositionalDataModule(LightningDataModule):
    """One compositional benchmark for ``diffperc test`` (batches are lists of item dicts).

    Args:
        task: a name of :data:`TASKS` (winoground, vg_relation, ..., selfbench).
        root: the benchmark folder (layouts in the module docstring).
        image_size: square side the images are resized to (512 for SD 1.5/2, 1024 or 512 for SD3).
        subtask: the loader's subtask (CLEVR subtask, SugarCrepe subset, Self-Bench tag, Winoground tag, ...).
        loader_kwargs: other options of the loader (``image_root``, ``model``, ``cfg``, ``filter_file``, ...).
        limit: keep the first ``limit`` items (quick runs).
        batch_size, num_workers: DataLoader settings.
    """

    def __init__(self, task: str = "winoground", root: str = "data/winoground", image_size: int = 512,
                 subtask: str | None = None, loader_kwargs: dict[str, Any] | None = None, limit: int | None = None,
                 batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown compositionality task {task!r}; known: {', '.join(TASKS)}")
        self.task, self.root, self.image_size, self.subtask = task, root, image_size, subtask
        self.loader_kwargs, self.limit = dict(loader_kwargs or {}), limit
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset: CompositionalDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        kw = dict(self.loader_kwargs)
        if self.subtask is not None:
            kw["subtask"] = self.subtask
        items = load_task(self.task, self.root, **kw)
        self.dataset = CompositionalDataset(items[: self.limit] if self.limit else items, self.image_size)

    def test_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("test")
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_as_list)

    predict_dataloader = test_dataloader
