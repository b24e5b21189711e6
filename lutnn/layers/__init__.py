"""LUT layers: drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``."""
from .base import MODES, STE_IMPLS, LUTBase, Mode, SteImpl, default_subvec_len, resolve_codebooks
from .conv import LUTConv2d, conv_unsupported_reason
from .linear import LUTLinear
from .quant import QuantizedTable

__all__ = [
    "LUTBase", "LUTConv2d", "LUTLinear", "MODES", "Mode", "QuantizedTable", "STE_IMPLS", "SteImpl",
    "conv_unsupported_reason", "default_subvec_len", "resolve_codebooks",
]
