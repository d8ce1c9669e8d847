"""Adapters that plug diffperc backbones into other frameworks.

Each submodule imports its framework on import and is optional (not imported by ``import diffperc``):

- :mod:`diffperc.integrations.mmseg`: ``DiffPercBackbone`` in mmsegmentation's ``MODELS``
  (extra ``mmseg``; install with ``scripts/install_mmseg.sh``).
"""
