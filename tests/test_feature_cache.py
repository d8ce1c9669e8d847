"""diffperc.feature_cache: round trip, keying by setting and by input content, atomic writes, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from diffperc.feature_cache import FeatureCache, setting_hash, tensor_key, text_key


def test_round_trip_and_setting_folder(tmp_path):
    cache = FeatureCache(tmp_path, {"model": "digits", "tap": "up_blocks.1", "timestep": 50})
    a = torch.randn(3, 4, 2, 2)
    assert cache.load("x") is None and cache.misses == 1
    path = cache.save("x", {"features": a, "index": torch.arange(3)})
    got = cache.load("x")
    assert torch.equal(got["features"], a) and torch.equal(got["index"], torch.arange(3)) and cache.hits == 1
    assert path.parent == cache.folder and "x" in cache
    # the setting is written for a reader, and key order does not change the folder
    assert json.loads((cache.folder / "key.json").read_text())["tap"] == "up_blocks.1"
    same = FeatureCache(tmp_path, {"timestep": 50, "tap": "up_blocks.1", "model": "digits"})
    assert same.folder == cache.folder and torch.equal(same.load("x")["features"], a)
    other = FeatureCache(tmp_path, {"model": "digits", "tap": "up_blocks.1", "timestep": 51})
    assert other.folder != cache.folder and other.load("x") is None
    assert not list(cache.folder.glob(".*.tmp"))  # no temporary left behind


def test_keys_follow_content():
    x = torch.rand(2, 3, 8, 8)
    assert tensor_key(x) == tensor_key(x.clone())
    assert tensor_key(x) != tensor_key(x.flip(-1))  # an augmented image is another item
    assert tensor_key(x) != tensor_key(x.double())  # dtype is part of the key
    assert tensor_key(x[:1]) != tensor_key(x[:1].reshape(1, 3, 4, 16))  # and the shape
    assert text_key("a") != text_key("b") and len(text_key("a")) == 16
    assert setting_hash({"a": 1, "b": [1, 2]}) == setting_hash({"b": [1, 2], "a": 1})


def test_get_or_compute_calls_only_for_missing(tmp_path):
    cache = FeatureCache(tmp_path, {"k": 1})
    calls = []

    def compute(pos):
        calls.append(list(pos))
        return [{"f": torch.full((2,), float(p))} for p in pos]

    first = cache.get_or_compute(["a", "b"], compute)
    again = cache.get_or_compute(["b", "c", "a"], compute)
    assert calls == [[0, 1], [1]]  # the second call computes only "c" (position 1)
    assert [float(o["f"][0]) for o in first] == [0.0, 1.0]
    assert [float(o["f"][0]) for o in again] == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="returned 0 results for 1"):
        cache.get_or_compute(["d"], lambda pos: [])


def test_bad_input_and_corrupt_file(tmp_path):
    with pytest.raises(TypeError, match="JSON-like"):
        FeatureCache(tmp_path, {"model": object()})
    cache = FeatureCache(tmp_path, {"k": 1})
    with pytest.raises(ValueError, match="without slashes"):
        cache.path("a/b")
    with pytest.raises(ValueError, match="at least one tensor"):
        cache.save("a", {})
    path = cache.save("a", {"f": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:40])  # a truncated file (e.g. copied half)
    with pytest.raises(OSError, match="corrupt.*delete it"):
        cache.load("a")
