"""Build the small CLIP BPE tokenizer that ships in ``diffperc/assets/tokenizer``.

It is the real CLIP/Stable Diffusion byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``,
shipped by the PyPI package ``open-clip-torch``, MIT licence) cut to its first
``--merges`` merges. A prefix of a BPE merge list is itself a consistent BPE, so the ids of
the 512 byte tokens and of the kept merges equal Stable Diffusion's; rarer words split into
more pieces, and only the two special tokens get new ids (512 + merges, +1).

    python scripts/make_tokenizer.py --merges 8192 --out diffperc/assets/tokenizer

Needs ``pip install open-clip-torch`` (only for this script).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

FULL_CLIP_MERGES = 49152 - 256 - 2  # what CLIP keeps of the file (open_clip SimpleTokenizer)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_vocab(bpe_path: Path, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) of the CLIP BPE cut to its first ``n_merges`` merges."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    if not 0 < n_merges <= FULL_CLIP_MERGES:
        raise ValueError(f"--merges must be in 1..{FULL_CLIP_MERGES}, got {n_merges}")
    merges = [tuple(line.split()) for line in lines[1 : n_merges + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merges", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("diffperc/assets/tokenizer"))
    args = parser.parse_args()
    from open_clip.tokenizer import default_bpe

    vocab, merges = build_vocab(Path(default_bpe()), args.merges)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (args.out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
