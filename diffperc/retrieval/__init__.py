"""Origin identification (ID²) retrieval: embedder, durable FAISS index, HTTP service, command line.

Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models", ICML 2025
(arXiv 2501.02376). Modules are imported by path (``diffperc.retrieval.index``, ...) so that
``import diffperc`` never needs FAISS or FastAPI (the ``retrieval`` extra).
"""
