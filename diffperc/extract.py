"""``diffperc extract``: backbone features of a folder of images, streamed to safetensors.

- Each image's noise comes from its own generator, seeded by ``(seed, relative path)``: an
  image's features do not depend on which other images are in the folder or in its batch.
- ``recursive`` walks subfolders; names are relative paths without suffix (``sub/a``).
- ``resize``: ``stretch`` (to size x size), ``crop`` (short side to size, centre crop) or ``pad``
  (long side to size, grey bars); the original size and the mode are in the metadata.
- Streamed writing: one file per image, or one file whose tensors go to disk batch by batch
  (the safetensors header is written at the end, then the data is copied behind it), so memory
  stays flat in the number of images.
- ``prompt_file``: one prompt per image (``<relative path>\\t<prompt>`` lines).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from ._io import atomic_file
from .images import IMAGE_SUFFIXES, UnreadableImageError, fit, fit_box, open_image, to_tensor

__all__ = ["ExtractSummary", "SafetensorsStream", "extract_features", "image_seed", "list_image_files",
           "load_features", "read_prompt_file"]

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class ExtractSummary:
    """What :func:`extract_features` did: images written, unreadable ones skipped (name, reason), files ignored,
    files written; ``total``: images in a ``--sharded`` output after the run (rank 0 only; else None)."""

    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    total: int | None = None


def list_image_files(folder: str | os.PathLike, recursive: bool = False,
                     what: str = "IMAGES_DIR") -> tuple[list[str], list[str]]:
    """Relative posix paths of the images of ``folder`` (sorted; hidden files and folders skipped) and of
    its other files. Two images with the same name but different suffixes in one folder raise."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"{what} {str(folder)!r} is not a folder of images")
    entries = sorted(root.rglob("*") if recursive else root.iterdir())
    entries = [p for p in entries if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files = [p for p in entries if p.is_file()]
    images, names = [], {}
    other = [] if recursive else [f"{p.name}/" for p in entries if p.is_dir()]  # said so: they need --recursive
    for p in files:
        rel = p.relative_to(root).as_posix()
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            other.append(rel)
            continue
        key = rel.rsplit(".", 1)[0]
        if key in names:
            raise ValueError(f"{names[key]} and {rel} share the name {key!r}, which names their features: rename one")
        names[key] = rel
        images.append(rel)
    return images, other


def image_name(rel: str) -> str:
    """``"sub/a.png"`` -> ``"sub/a"``: the key of an image's features."""
    return rel.rsplit(".", 1)[0]


def image_seed(seed: int, rel: str) -> int:
    """The noise seed of one image: a hash of the run's seed and the image's relative path."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{rel}".encode()).digest()[:8], "little") >> 1


def read_prompt_file(path: str | os.PathLike, images: list[str], what: str = "--prompt-file",
                     require_all: bool = True) -> dict[str, str]:
    """``<relative path>\\t<prompt>`` lines (the path with or without its suffix) -> {relative path: prompt}.

    Raises:
        FileNotFoundError / ValueError: a missing file, a line without a tab, an unknown image, or (with
        ``require_all``) an image without a prompt (the first few are named).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: expected '<image path>\\t<prompt>' lines")
    by_key = {**{image_name(r): r for r in images}, **{r: r for r in images}}
    prompts: dict[str, str] = {}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{what} {file}:{n}: expected '<image path>\\t<prompt>', got {line[:60]!r}")
        key, text = line.split("\t", 1)
        if key.strip() not in by_key:
            raise ValueError(f"{what} {file}:{n}: {key.strip()!r} is not one of the images (relative paths, e.g. "
                             f"{images[0]!r})")
        prompts[by_key[key.strip()]] = text.strip()
    missing = [r for r in images if r not in prompts]
    if missing and require_all:
        raise ValueError(f"{what} {file} has no prompt for {len(missing)} image(s), e.g. {', '.join(missing[:3])}")
    return prompts


class SafetensorsStream:
    """Write a safetensors file tensor by tensor with flat memory: data goes to a temporary file as it
    comes; :meth:`close` writes the header, copies the data behind it and renames into place."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}-", suffix=".data", dir=self.path.parent)
        self._data_path, self._data = Path(name), os.fdopen(fd, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def add(self, key: str, tensor: Tensor) -> None:
        if key in self._entries:
            raise ValueError(f"tensor {key!r} was already written")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._data.write(raw)
        self._entries[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def close(self, metadata: dict[str, str]) -> Path:
        self._data.close()
        header = json.dumps({"__metadata__": metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        try:
            with atomic_file(self.path) as tmp, open(tmp, "wb") as f, open(self._data_path, "rb") as data:
                f.write(struct.pack("<Q", len(header)))
                f.write(header)
                shutil.copyfileobj(data, f, 1 << 20)
        finally:
            self._data_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)


def _noise(bb: nn.Module, seeds: list[int], size: int) -> Tensor | None:
    """Per-image noise (B*E, C, h, w), image-major, or None where the backbone adds none."""
    unet = getattr(bb, "unet", None)
    if unet is None or not getattr(bb, "add_noise", False):
        return None
    side = size // bb.vae_factor
    shape = (bb.ensemble_size, unet.config.in_channels, side, side)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _forward(bb: nn.Module, images: Tensor, prompts: list[str], seeds: list[int], size: int) -> list[Tensor]:
    """Features of a batch; each image's randomness comes from its own seed."""
    images = images.to(bb.device, bb.dtype)
    if getattr(bb, "latent_sample", "mean") == "sample":  # the VAE draws too: one call per image
        outs = [bb(images[i : i + 1], prompts=prompts[i], noise=_noise(bb, [s], size),
                   generator=torch.Generator().manual_seed(s)).features for i, s in enumerate(seeds)]
        return [torch.cat(fs) for fs in zip(*outs, strict=True)]
    noise = _noise(bb, seeds, size)
    kwargs = {"noise": noise} if noise is not None else {}
    return bb(images, prompts=prompts, **kwargs).features


@dataclass
class _Run:
    """What both extract paths (one process, :mod:`diffperc.extract_sharded`) share once the inputs are
    checked and the backbone is loaded."""

    root: Path
    rels: list[str]
    ignored: list[str]
    prompts: dict[str, str]
    bb: nn.Module
    model: str
    size: int
    resize: str
    seed: int
    store_dtype: torch.dtype

    def metadata(self, rels: list[str], originals: dict[str, list[int]]) -> dict[str, str]:
        return _metadata(self.bb, self.model, self.size, self.resize, self.prompts, rels, originals, self.seed)


def _prepare(images_dir: str | os.PathLike, model: str, layers: str, timestep: int | None, add_noise: bool | None,
             ensemble_size: int, prompt: str, prompt_file: str | os.PathLike | None, size: int | None, resize: str,
             recursive: bool, batch_size: int, device: str | torch.device | None,
             torch_dtype: str | torch.dtype | None, save_dtype: str | torch.dtype | None, seed: int) -> _Run:
    """List the images, read the prompts, check the options, load the backbone (errors before any work)."""
    from ._commands import native_size, parse_layers
    from .devices import load_backbone, resolve_dtype

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    rels, ignored = list_image_files(images_dir, recursive)
    if not rels:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(images_dir)!r}"
                                + ("" if recursive else " (subfolders are skipped without --recursive)"))
    prompts = read_prompt_file(prompt_file, rels) if prompt_file is not None else dict.fromkeys(rels, prompt)
    fit_box(1, 1, 1, resize)  # validates the mode before the model loads
    kwargs: dict[str, Any] = {"layers": parse_layers(layers), "ensemble_size": ensemble_size}
    kwargs.update({k: v for k, v in (("timestep", timestep), ("add_noise", add_noise)) if v is not None})
    bb = load_backbone(model, device=device, torch_dtype=torch_dtype, **kwargs)
    store_dtype = resolve_dtype(save_dtype if save_dtype is not None else torch_dtype, "--save-dtype")
    size = size or native_size(bb)
    if size % bb.size_multiple:
        raise ValueError(f"--size {size} is not a multiple of {bb.size_multiple}: use "
                         f"{max(bb.size_multiple, size // bb.size_multiple * bb.size_multiple)}")
    return _Run(Path(images_dir).expanduser(), rels, ignored, prompts, bb, model, size, resize, seed, store_dtype)


def _per_image(run: _Run, feats: list[Tensor], i: int) -> dict[str, Tensor]:
    """Image ``i``'s features of a batch, {layer: (C, S/r, S/r)} on the CPU in the stored dtype."""
    return {layer: f[i].to("cpu", run.store_dtype) for layer, f in zip(run.bb.layers, feats, strict=True)}


def extract_features(images_dir: str | os.PathLike, out: str | os.PathLike, model: str = "digits",
                     layers: str = "vpd", timestep: int | None = None, add_noise: bool | None = None,
                     ensemble_size: int = 1, prompt: str = "", prompt_file: str | os.PathLike | None = None,
                     size: int | None = None, resize: str = "stretch", recursive: bool = False, batch_size: int = 8,
                     device: str | torch.device | None = None, torch_dtype: str | torch.dtype | None = None,
                     save_dtype: str | torch.dtype | None = None, seed: int = 0, strict: bool = False,
                     err: TextIO | None = None) -> ExtractSummary:
    """Backbone features of every image of a folder, to safetensors (see ``diffperc extract --help``).

    Args:
        images_dir: folder of images (sorted by relative path; other files are listed as ignored).
        out: ``*.safetensors`` -> one file, keys ``"<name>/<layer>"``; otherwise a folder with one
            ``<name>.safetensors`` per image, keys ``"<layer>"``. ``name`` = relative path without
            suffix. Tensors are (C, S/r, S/r).
        model, layers, timestep, add_noise, ensemble_size: backbone and its options (None: its default).
        prompt: prompt of every image; ``prompt_file`` gives one per image instead.
        size: square side; default the model's native size. resize: stretch, crop or pad.
        recursive: include subfolders.
        batch_size: images per backbone call (results do not depend on it).
        device, torch_dtype: where and in which precision the model runs (default: cuda when available, fp32).
        save_dtype: dtype of the stored tensors (default: ``torch_dtype``).
        seed: with each image's relative path, seeds that image's noise.
        strict: raise :class:`UnreadableImageError` at the first unreadable image instead of skipping it.
        err: stream for progress and the report (default stderr).

    Many GPUs or nodes: :func:`diffperc.extract_sharded.extract_features_sharded` (``--sharded``).
    """
    err = err or sys.stderr
    run = _prepare(images_dir, model, layers, timestep, add_noise, ensemble_size, prompt, prompt_file, size, resize,
                   recursive, batch_size, device, torch_dtype, save_dtype, seed)
    out, rels = Path(out), run.rels
    stream = SafetensorsStream(out) if out.suffix == ".safetensors" else None
    summary, originals = ExtractSummary(ignored=run.ignored), {}
    try:
        with tqdm(total=len(rels), desc="extract", unit="img", file=err) as bar:
            for start in range(0, len(rels), batch_size):
                chunk = rels[start : start + batch_size]
                batch, names = _read_batch(run.root, chunk, run.size, resize, strict, summary, originals, err)
                bar.update(len(chunk))
                if not batch:
                    continue
                feats = forward_batch(run, torch.stack(batch), names)
                for i, rel in enumerate(names):
                    per_image, name = _per_image(run, feats, i), image_name(rel)
                    if stream is not None:
                        for layer, t in per_image.items():
                            stream.add(f"{name}/{layer}", t)
                    else:
                        summary.outputs.append(_save(per_image, out / f"{name}.safetensors",
                                                     run.metadata([rel], originals)))
                summary.written += names
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    if stream is not None:
        if summary.written:
            summary.outputs.append(stream.close(run.metadata(summary.written, originals)))
        else:
            stream.abort()
    _report(summary, out, err)
    return summary


def forward_batch(run: _Run, images: Tensor, rels: list[str]) -> list[Tensor]:
    """Features (one (B, C, S/r, S/r) per layer) of a batch of fitted images (B, 3, S, S) named by ``rels``;
    each image's noise comes from ``(run.seed, its relative path)``."""
    with torch.no_grad():
        return _forward(run.bb, images, [run.prompts[r] for r in rels], [image_seed(run.seed, r) for r in rels],
                        run.size)


def read_image(root: Path, rel: str, size: int, resize: str) -> tuple[Tensor, list[int]]:
    """One image fitted to (3, size, size) in [0, 1] and its original [height, width]; raises
    :class:`UnreadableImageError`."""
    im = open_image(root / rel, name=rel)
    return to_tensor(fit(im, size, resize)), [im.height, im.width]


def _read_batch(root: Path, rels: list[str], size: int, resize: str, strict: bool, summary: ExtractSummary,
                originals: dict[str, list[int]], err: TextIO) -> tuple[list[Tensor], list[str]]:
    """Read and fit images; unreadable ones raise (strict) or are reported on ``err`` and recorded as skipped."""
    batch, names = [], []
    for rel in rels:
        try:
            image, originals[rel] = read_image(root, rel, size, resize)
        except UnreadableImageError as e:
            if strict:
                raise UnreadableImageError(f"{e} (--strict stops at the first unreadable image)") from e
            summary.skipped.append((rel, str(e)))
            tqdm.write(f"skipped unreadable image {e}", file=err)
            continue
        batch.append(image)  # (3, S, S)
        names.append(rel)
    return batch, names


def _metadata(bb: nn.Module, model: str, size: int, resize: str, prompts: dict[str, str], rels: list[str],
              originals: dict[str, list[int]], seed: int) -> dict[str, str]:
    info = bb.feature_info
    same = len({prompts[r] for r in rels}) == 1  # one prompt for all: "prompt"; else one per image: "prompts"
    return {"diffperc_version": __version__, "model": model, "size": str(size), "resize": resize, "seed": str(seed),
            "prompt": prompts[rels[0]] if same else "", "prompts": "" if same else json.dumps([prompts[r] for r in rels]),
            "layers": json.dumps(info.names()), "channels": json.dumps(info.channels()),
            "reductions": json.dumps(info.reductions()), "images": json.dumps([image_name(r) for r in rels]),
            "files": json.dumps(rels), "original_sizes": json.dumps([originals[r] for r in rels]),
            "compute_dtype": str(bb.dtype).removeprefix("torch."),
            "backbone_config": json.dumps(getattr(bb, "config", {}), default=str)}


def _save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


def _report(summary: ExtractSummary, out: Path, err: TextIO) -> None:
    total = len(summary.written) + len(summary.skipped)
    print(f"extract: wrote features of {len(summary.written)} of {total} images to {out}", file=err)
    if summary.skipped:
        print(f"extract: skipped {len(summary.skipped)} unreadable image(s): "
              f"{', '.join(n for n, _ in summary.skipped)}", file=err)
    if summary.ignored:
        dirs = sum(n.endswith("/") for n in summary.ignored)
        print(f"extract: ignored {len(summary.ignored) - dirs} file(s) without an image suffix"
              f"{f' and {dirs} subfolder(s) (use --recursive)' if dirs else ''}: "
              f"{', '.join(summary.ignored[:10])}{' ...' if len(summary.ignored) > 10 else ''}", file=err)
    if not summary.written:
        print("extract: error: no image could be read; nothing was written", file=err)


def load_features(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, dict[str, Tensor]]:
    """Read what ``diffperc extract`` wrote: {image name: {layer: (C, S/r, S/r)}}, sorted by name.

    Args:
        path: one ``*.safetensors`` file (keys ``<name>/<layer>``), a ``--sharded`` folder (its
            ``index.json``, or its ``shard-*.safetensors`` files when the index is missing) or a folder
            of one ``<name>.safetensors`` per image. Hidden (temporary) files are ignored.
        names: only these images (name = relative path without suffix); default all.

    Raises:
        FileNotFoundError: no such path, or a shard named by the index is missing (rerun the same
            ``extract --sharded`` command: it recomputes only the missing shard's images).
        KeyError: a name in ``names`` that is not in the features.
    """
    path = Path(path).expanduser()
    if path.is_file():
        got = _read_keyed([path], None)
    elif (path / "index.json").is_file():
        index = json.loads((path / "index.json").read_text())
        by_shard: dict[str, list[str]] = {}
        for entry in index["images"].values():
            by_shard.setdefault(entry["shard"], []).extend(entry["keys"])
        missing = sorted(f for f in by_shard if not (path / f).is_file())
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) {', '.join(missing)} named in index.json are missing: rerun the "
                                    "same `diffperc extract --sharded` command to recompute their images")
        got = _read_keyed([path / f for f in sorted(by_shard)], by_shard)
    elif path.is_dir() and any(path.glob("shard-*.safetensors")):
        got = _read_keyed(sorted(path.glob("shard-*.safetensors")), None)
    elif path.is_dir():
        from safetensors.torch import load_file

        files = [f for f in sorted(path.rglob("*.safetensors"))
                 if not any(part.startswith(".") for part in f.relative_to(path).parts)]
        got = {f.relative_to(path).with_suffix("").as_posix(): load_file(f) for f in files}
    else:
        raise FileNotFoundError(f"{str(path)!r} does not exist: expected the --out of `diffperc extract`")
    if names is not None:
        unknown = [n for n in names if n not in got]
        if unknown:
            raise KeyError(f"no features of {', '.join(unknown[:3])} in {path} (names are relative paths without "
                           f"suffix, e.g. {next(iter(got), '?')!r})")
        got = {n: got[n] for n in names}
    return dict(sorted(got.items()))


def _read_keyed(files: list[Path], keys: dict[str, list[str]] | None) -> dict[str, dict[str, Tensor]]:
    """Tensors ``<name>/<layer>`` of safetensors files (only ``keys[file name]`` where given); the first file
    holding an image wins."""
    from safetensors import safe_open

    out: dict[str, dict[str, Tensor]] = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in (keys[file.name] if keys is not None else f.keys()):
                name, layer = key.rsplit("/", 1)
                if keys is None and name in out and layer in out[name]:
                    continue
                out.setdefault(name, {})[layer] = f.get_tensor(key)
    return out
