"""Common machinery of LUT layers: prototypes, temperature, modes and cached tables."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as LF
from .fused import ste_matmul
from .quant import Granularity, QuantizedTable

Mode = Literal["auto", "ste", "soft", "lut", "dense"]
MODES: tuple[str, ...] = ("auto", "ste", "soft", "lut", "dense")
SteImpl = Literal["fused", "compiled", "reference"]
# How "ste" mode is computed: one autograd Function with a closed-form backward
# (``fused.py``, the default), the same with its chunk backward compiled by
# torch.compile (C++ on CPU, Triton on CUDA; compiles on first use), or the autograd
# composition of ``functional.lut_matmul`` (the reference the others are tested against).
STE_IMPLS: tuple[str, ...] = ("fused", "compiled", "reference")
# V when a layer is given neither C nor V: 8 floats = one 32-byte row per prototype.
DEFAULT_SUBVEC_LEN = 8


def default_subvec_len(in_features: int) -> int:
    """Largest divisor of D that is <= DEFAULT_SUBVEC_LEN, so defaults never fail on odd widths."""
    return max(v for v in range(1, DEFAULT_SUBVEC_LEN + 1) if in_features % v == 0)


def resolve_codebooks(
    in_features: int,
    num_codebooks: int | None,
    subvec_len: int | None,
    where: str = "layer",
) -> tuple[int, int]:
    """Return ``(C, V)`` from whichever of the two was given, checking ``C * V == D``."""
    if num_codebooks is None and subvec_len is None:
        raise ValueError(f"{where}: give num_codebooks (C) or subvec_len (V)")
    if subvec_len is not None and subvec_len <= 0 or num_codebooks is not None and num_codebooks <= 0:
        raise ValueError(f"{where}: C and V must be positive, got C={num_codebooks}, V={subvec_len}")
    if subvec_len is None:
        subvec_len = in_features // num_codebooks
    if num_codebooks is None:
        num_codebooks = in_features // subvec_len
    if num_codebooks * subvec_len != in_features:
        raise ValueError(
            f"{where}: input dim D={in_features} is not C*V (C={num_codebooks}, V={subvec_len}); "
            f"V must divide D — divisors of {in_features}: {_divisors(in_features)}"
        )
    return num_codebooks, subvec_len


def _bit_checksum(t: Tensor) -> Tensor:
    """Wrapping integer sum of the raw bit patterns: changing any one element changes it (a permutation does not).

    Accumulates in int32 (int64 for 8-byte types): exact modulo 2**32, and 4x faster than an int64 sum.
    """
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().view(ints).sum(dtype=torch.int64 if t.element_size() == 8 else torch.int32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


class LUTBase(nn.Module):
    """Owns ``prototypes [C, K, V]``, ``log_tau`` and the ``[M, D]`` product.

    Subclasses only reshape their input to rows ``[N, D]`` (``_rows``) and back.

    Modes (``self.mode``):

    * ``"ste"``  — hard argmin forward, soft-argmin gradient (LUT-NN training).
    * ``"soft"`` — soft-argmin forward and backward (smooth; for analysis/gradcheck).
    * ``"lut"``  — integer codes + precomputed table, no ``x @ W`` (inference).
    * ``"dense"``— the original ``x @ W`` (calibration, baselines).
    * ``"auto"`` — ``"ste"`` while ``training`` else ``"lut"`` (default).

    ``ste_impl`` picks how ``"ste"`` is computed (see ``STE_IMPLS``): set it on a layer with
    :meth:`set_ste_impl`, or for every layer without its own choice on the class,
    ``LUTBase.ste_impl = "reference"``.
    """

    in_features: int
    out_features: int
    ste_impl: SteImpl = "fused"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_codebooks: int | None = None,
        subvec_len: int | None = None,
        num_prototypes: int = 16,
        init_temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= num_prototypes <= 256:
            raise ValueError(f"num_prototypes (K) must be in [1, 256] so a code fits in uint8, got {num_prototypes}")
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        c, v = resolve_codebooks(in_features, num_codebooks, subvec_len, type(self).__name__)
        self.in_features, self.out_features = in_features, out_features
        self.num_codebooks, self.subvec_len, self.num_prototypes = c, v, num_prototypes
        factory = {"device": device, "dtype": dtype}
        self.prototypes = nn.Parameter(torch.randn(c, num_prototypes, v, **factory))
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_temperature), **factory))
        self.mode: Mode = "auto"
        self._table_cache: tuple[tuple, Tensor] | None = None
        self._qtable: QuantizedTable | None = None
        self._qtable_key: tuple | None = None

    def _copy_dense(self, layer: nn.Module) -> "LUTBase":
        """Take weight and bias from the dense layer being replaced (for ``from_dense``)."""
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        return self

    # -- subclass hooks -------------------------------------------------------------
    def weight_2d(self) -> Tensor:
        """The weight as ``[M, D]`` (the layout the tables are built from)."""
        raise NotImplementedError

    def bias_or_none(self) -> Tensor | None:
        return getattr(self, "bias", None)

    # -- modes ----------------------------------------------------------------------
    @property
    def temperature(self) -> Tensor:
        return self.log_tau.exp()

    def set_mode(self, mode: Mode) -> "LUTBase":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        return self

    def set_ste_impl(self, impl: SteImpl) -> "LUTBase":
        if impl not in STE_IMPLS:
            raise ValueError(f"ste_impl must be one of {STE_IMPLS}, got {impl!r}")
        self.ste_impl = impl
        return self

    def fused_ste(self) -> bool:
        """Whether this forward runs the fused straight-through estimator."""
        return self.effective_mode() == "ste" and self.ste_impl != "reference"

    def effective_mode(self) -> str:
        if self.mode == "auto":
            return "ste" if self.training else "lut"
        return self.mode

    # -- tables ---------------------------------------------------------------------
    def _params_key(self) -> tuple:
        """Identity, version counter and content checksum of the parameters the tables come from.

        Keyed on the parameters themselves, not ``weight_2d()`` (a fresh copy for channels_last
        conv weights). Version counters miss edits through ``.data`` (``w.data.mul_(2)``, as pruning
        and weight-averaging code does: ``.data`` has its own counter), so an integer sum of the
        bit patterns, one pass over each tensor, is part of the key too.
        """
        params = (self.prototypes, self.weight)
        sums = [int(c) for c in (_bit_checksum(p) for p in params)]
        return tuple((p.data_ptr(), p._version, p.device, p.dtype, c) for p, c in zip(params, sums))

    def table(self) -> Tensor:
        """``[C, K, M]`` table; rebuilt only when prototypes or weight changed."""
        if torch.compiler.is_compiling():
            # Traced tensors (torch.compile/export, TensorRT) have no data pointer to key a
            # cache on: emit the build into the graph, where it is a parameter-only constant.
            return LF.build_table(self.prototypes.float(), self.weight_2d().float())
        key = self._params_key()
        if self._table_cache is None or self._table_cache[0] != key:
            with torch.no_grad():
                t = LF.build_table(self.prototypes.float(), self.weight_2d().float())
            self._table_cache = (key, t)
        return self._table_cache[1]

    def quantize_tables(self, granularity: Granularity | None = "output") -> dict[str, float] | None:
        """Switch lut mode to int8 tables (or back to fp32 with ``None``); returns the error report."""
        if granularity is None:
            self._qtable, self._qtable_key = None, None
            return None
        self._qtable = QuantizedTable.from_table(self.table(), granularity)
        self._qtable_key = self._params_key()
        return self._qtable.report(self.table())

    @property
    def quantized_table(self) -> QuantizedTable | None:
        if self._qtable is not None and not torch.compiler.is_compiling() and self._qtable_key != self._params_key():
            # Parameters moved since quantisation: requantise with the same granularity.
            self.quantize_tables(self._qtable.granularity)
        return self._qtable

    def encode(self, rows: Tensor) -> Tensor:
        """Codes ``[N, C]``, always from fp32 distances (fp16/bf16 layers and inputs pick the fp32 codes)."""
        return LF.encode(rows.float(), self.prototypes.float())

    # -- core -----------------------------------------------------------------------
    def _matmul_rows(self, rows: Tensor) -> Tensor:
        """``[N, D] -> [N, M]`` according to the current mode."""
        mode = self.effective_mode()
        w, b = self.weight_2d(), self.bias_or_none()
        if mode == "dense":
            return F.linear(rows, w, b)
        with self._fp32(rows):
            rows = rows.float()
            b32 = None if b is None else b.float()
            if mode == "lut":
                codes = self.encode(rows)
                q = self.quantized_table
                y = q.lookup(codes, b32) if q is not None else LF.table_lookup(codes, self.table(), b32)
            elif self.fused_ste():
                y = ste_matmul(rows, self.prototypes.float(), w.float(), b32, self.log_tau.float(),
                               self.ste_impl == "compiled")
            else:
                y = LF.lut_matmul(rows, self.prototypes.float(), w.float(), b32, self.log_tau.float(),
                                  hard=(mode == "ste"))
            return y.to(w.dtype)

    @staticmethod
    def _fp32(x: Tensor):
        """Encoding runs in fp32 even under autocast or after ``.half()``: bf16/fp16 distances would
        pick other codes in training than the fp32 lookup picks at inference."""
        device = x.device.type
        return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, C={self.num_codebooks}, "
            f"K={self.num_prototypes}, V={self.subvec_len}, mode={self.mode}"
        )
