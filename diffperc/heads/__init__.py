"""Task heads: pure torch modules sized from ``bb.feature_info`` (channels and reductions).

Every dense head is called as ``head(features, size)`` with the backbone's feature maps in
``feature_info`` order and the output (H, W).
"""

from .depth import VPDDepthHead as VPDDepthHead
from .referring import RefSegDecoder as RefSegDecoder
from .segmentation import SemanticFPNHead as SemanticFPNHead
from .vpd import TextAdapter as TextAdapter
from .vpd import concat_attention as concat_attention
from .vpd import vpd_in_channels as vpd_in_channels

__all__ = ["RefSegDecoder", "SemanticFPNHead", "TextAdapter", "VPDDepthHead", "concat_attention", "vpd_in_channels"]
