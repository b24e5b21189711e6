"""``LUTLinear``: a drop-in ``nn.Linear`` whose product is a table lookup."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LUTBase, default_subvec_len


class LUTLinear(LUTBase):
    """``y = x @ W.T + b`` computed as ``sum_c T[c, code_c(x)] + b``.

    Accepts any leading batch dimensions, like ``nn.Linear``. ``weight`` and ``bias``
    keep ``nn.Linear``'s names and layout so dense checkpoints load unchanged.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        num_codebooks: int | None = None,
        subvec_len: int | None = None,
        num_prototypes: int = 16,
        init_temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if num_codebooks is None and subvec_len is None:
            subvec_len = default_subvec_len(in_features)
        super().__init__(
            in_features, out_features, num_codebooks, subvec_len, num_prototypes, init_temperature, device, dtype
        )
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = ref.weight
        self.bias = ref.bias

    @classmethod
    def from_dense(cls, layer: nn.Linear, **lut_kwargs) -> "LUTLinear":
        """Wrap an existing ``nn.Linear``, sharing nothing but copying its weight and bias."""
        p = layer.weight
        lut = cls(layer.in_features, layer.out_features, layer.bias is not None,
                  device=p.device, dtype=p.dtype, **lut_kwargs)
        return lut._copy_dense(layer)

    def weight_2d(self) -> Tensor:
        return self.weight

    def rows(self, x: Tensor) -> Tensor:
        """The ``[N, D]`` rows this layer multiplies (what calibration captures)."""
        return x.reshape(-1, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LUTLinear expects last dim {self.in_features}, got input of shape {tuple(x.shape)}")
        y = self._matmul_rows(self.rows(x))
        return y.reshape(*x.shape[:-1], self.out_features)
