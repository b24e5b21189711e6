"""Symmetric int8 quantisation of lookup tables.

Two granularities:

* ``"output"`` (default): one scale per output column ``m``. All codebooks share the
  scale, so ``sum_c Tq[c, code_c, m]`` accumulates in integers and is scaled once —
  the layout integer kernels want.
* ``"codebook"``: one scale per codebook ``c``. Tighter when codebooks differ in
  range, but every table read must be rescaled before accumulating.

Either way each table entry is off by at most ``scale / 2``, so an output is off by at
most the sum of the half-scales it reads; :meth:`QuantizedTable.error_bound` returns
that bound per output column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .functional import table_lookup

Granularity = Literal["output", "codebook"]
GRANULARITIES: tuple[str, ...] = ("output", "codebook")


@dataclass
class QuantizedTable:
    values: Tensor  # int8, [C, K, M]
    scale: Tensor  # float, [M] ("output") or [C] ("codebook")
    granularity: Granularity

    @classmethod
    def from_table(cls, table: Tensor, granularity: Granularity = "output") -> "QuantizedTable":
        if granularity not in GRANULARITIES:
            raise ValueError(f"int8 table granularity must be one of {GRANULARITIES}, got {granularity!r}")
        reduce_dims = (0, 1) if granularity == "output" else (1, 2)
        amax = table.detach().abs().amax(dim=reduce_dims)
        scale = (amax / 127.0).clamp_min(torch.finfo(table.dtype).tiny)
        q = torch.round(table.detach() / cls._broadcast(scale, granularity)).clamp_(-127, 127)
        return cls(q.to(torch.int8), scale, granularity)

    @staticmethod
    def _broadcast(scale: Tensor, granularity: str) -> Tensor:
        return scale.view(1, 1, -1) if granularity == "output" else scale.view(-1, 1, 1)

    def dequantize(self) -> Tensor:
        return self.values.to(self.scale.dtype) * self._broadcast(self.scale, self.granularity)

    def lookup(self, codes: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.granularity == "output":
            # Integer sums are exact in fp32 while |sum| < 2**24, i.e. for C < 132k codebooks.
            acc = table_lookup(codes, self.values.to(self.scale.dtype))
            out = acc * self.scale
        else:
            out = table_lookup(codes, self.dequantize())
        return out if bias is None else out + bias

    def error_bound(self) -> Tensor:
        """Worst-case ``|y_int8 - y_fp32|`` per output column, ``[M]``."""
        num_codebooks, _, m = self.values.shape
        if self.granularity == "output":
            return num_codebooks * self.scale / 2
        return (self.scale.sum() / 2).expand(m)

    def report(self, table: Tensor) -> dict[str, float]:
        """Table error against the fp32 ``table`` it came from."""
        err = self.dequantize() - table.detach()
        return {
            "table_rel_error": float(err.norm() / table.detach().norm().clamp_min(1e-30)),
            "table_max_abs_error": float(err.abs().max()),
            "output_error_bound": float(self.error_bound().max()),
        }
