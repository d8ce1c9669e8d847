"""LLaVA-style multimodal LLM with diffusion visual features (Mustafar): towers, fusion, projector, task.

Modules: ``towers`` (DiffusionTower, CLIPTower, PixelPatchTower), ``encoder`` (fusion + projector),
``conversation`` (LLaVA prompt formats, image-token splicing, label masking), ``model`` (LlavaModel
around a Hugging Face causal LM), ``leakage`` (prompt-leakage probes), ``metrics`` (MMVP, GQA).
Nothing heavy is imported here.
"""
