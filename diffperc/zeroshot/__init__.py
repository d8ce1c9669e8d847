"""Training-free perception with diffusion features: semantic correspondence (``correspondence.py``,
DIFT / SD-DINO), the diffusion classifier (``classifier.py``) and image-text matching with its score
(``matching.py``). Reach them by module path."""
