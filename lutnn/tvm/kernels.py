"""The two LUT inference steps as TensorIR (TVMScript) functions, unscheduled.

* ``encode``: ``codes[n, c] = argmin_k |x[n, c-block] - P[c, k]|^2`` (uint8). The
  ``|x|^2`` term is the same for every ``k`` and is dropped, so the kernel computes
  ``|P[c, k]|^2 - 2 x.P[c, k]`` (``pnorm`` is passed in, it is a per-layer constant).
* ``lookup`` (read-accumulate): ``y[n, m] = sum_c T[c, codes[n, c], m] + b[m]``;
  with int8 tables the sum runs in int16 (or int32 when ``C * 127`` could overflow
  int16) and is scaled once per output column: ``y = scale[m] * acc + b[m]``
  (``lutnn.layers.quant`` granularity ``"output"``).

Shapes are static: a kernel is specialised (and tuned) per layer shape. Schedules live
in :mod:`lutnn.tvm.schedules`; these functions only say *what* is computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tvm import tirx
from tvm.script import tirx as T

TableDType = Literal["float32", "int8"]
# Function attribute that marks a LUT kernel (how passes and tuning recognise them).
KERNEL_ATTR = "lutnn.kernel"
INT16_MAX_CODEBOOKS = 32767 // 127  # C * 127 must fit int16 for int16 accumulation


@dataclass(frozen=True)
class EncodeSpec:
    n: int  # rows
    c: int  # codebooks
    k: int  # prototypes per codebook
    v: int  # sub-vector length

    kind = "encode"

    @property
    def name(self) -> str:
        return f"lut_encode_n{self.n}_c{self.c}_k{self.k}_v{self.v}"


@dataclass(frozen=True)
class LookupSpec:
    n: int  # rows
    c: int  # codebooks
    k: int  # prototypes per codebook
    m: int  # output features
    table_dtype: TableDType = "float32"

    kind = "lookup"

    def __post_init__(self) -> None:
        if self.table_dtype not in ("float32", "int8"):
            raise ValueError(f"table_dtype must be 'float32' or 'int8', got {self.table_dtype!r}")

    @property
    def acc_dtype(self) -> str:
        return accumulator_dtype(self.table_dtype, self.c)

    @property
    def name(self) -> str:
        suffix = "" if self.table_dtype == "float32" else "_i8"
        return f"lut_lookup_n{self.n}_c{self.c}_k{self.k}_m{self.m}{suffix}"


KernelSpec = EncodeSpec | LookupSpec


def accumulator_dtype(table_dtype: TableDType, num_codebooks: int) -> str:
    """fp32 for fp32 tables; int16 for int8 tables unless ``C * 127`` could overflow it."""
    if table_dtype == "float32":
        return "float32"
    return "int16" if num_codebooks <= INT16_MAX_CODEBOOKS else "int32"


def encode_func(spec: EncodeSpec) -> tirx.PrimFunc:
    """``(x [N, C*V] f32, protos_t [C, V, K] f32, pnorm [C, K] f32) -> codes [N, C] u8``.

    Prototypes come transposed (``[C, V, K]``) so a vector over ``k`` is contiguous.
    """
    n, c, k, v = spec.n, spec.c, spec.k, spec.v
    d = c * v

    @T.prim_func(s_tir=True)
    def lut_encode(
        x: T.Buffer((n, d), "float32"),
        protos_t: T.Buffer((c, v, k), "float32"),
        pnorm: T.Buffer((c, k), "float32"),
        codes: T.Buffer((n, c), "uint8"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "encode"})
        dist = T.sblock_alloc_buffer((n, c, k), "float32")
        best = T.sblock_alloc_buffer((n, c), "float32")
        for i0, i1, i2, i3 in T.grid(n, c, k, v):
            with T.sblock("dist"):
                vn, vc, vk, vv = T.axis.remap("SSSR", [i0, i1, i2, i3])
                with T.init():
                    dist[vn, vc, vk] = pnorm[vc, vk]
                dist[vn, vc, vk] = dist[vn, vc, vk] - T.float32(2) * x[vn, vc * v + vv] * protos_t[vc, vv, vk]
        for i0, i1, i2 in T.grid(n, c, k):
            with T.sblock("argmin"):
                vn, vc, vk = T.axis.remap("SSR", [i0, i1, i2])
                with T.init():
                    best[vn, vc] = T.float32("inf")
                    codes[vn, vc] = T.uint8(0)
                # strict '<' keeps the first minimum, like torch.argmin
                codes[vn, vc] = T.Select(dist[vn, vc, vk] < best[vn, vc], T.Cast("uint8", vk), codes[vn, vc])
                best[vn, vc] = T.min(dist[vn, vc, vk], best[vn, vc])

    return lut_encode


def lookup_func(spec: LookupSpec) -> tirx.PrimFunc:
    """fp32: ``(codes, table [C,K,M], bias [M]) -> y``; int8: ``(codes, table, scale [M], bias) -> y``."""
    return _lookup_f32(spec) if spec.table_dtype == "float32" else _lookup_i8(spec)


def _lookup_f32(spec: LookupSpec) -> tirx.PrimFunc:
    n, c, k, m = spec.n, spec.c, spec.k, spec.m

    @T.prim_func(s_tir=True)
    def lut_lookup(
        codes: T.Buffer((n, c), "uint8"),
        table: T.Buffer((c, k, m), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer((n, m), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "lookup"})
        for i0, i1, i2 in T.grid(n, m, c):
            with T.sblock("acc"):
                vn, vm, vc = T.axis.remap("SSR", [i0, i1, i2])
                with T.init():
                    y[vn, vm] = bias[vm]
                y[vn, vm] = y[vn, vm] + table[vc, T.Cast("int32", codes[vn, vc]), vm]

    return lut_lookup


def _lookup_i8(spec: LookupSpec) -> tirx.PrimFunc:
    n, c, k, m, acc_t = spec.n, spec.c, spec.k, spec.m, spec.acc_dtype

    @T.prim_func(s_tir=True)
    def lut_lookup_i8(
        codes: T.Buffer((n, c), "uint8"),
        table: T.Buffer((c, k, m), "int8"),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer((n, m), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "lookup"})
        acc = T.sblock_alloc_buffer((n, m), acc_t)
        for i0, i1, i2 in T.grid(n, m, c):
            with T.sblock("acc"):
                vn, vm, vc = T.axis.remap("SSR", [i0, i1, i2])
                with T.init():
                    acc[vn, vm] = T.Cast(acc_t, 0)
                acc[vn, vm] = acc[vn, vm] + T.Cast(acc_t, table[vc, T.Cast("int32", codes[vn, vc]), vm])
        for i0, i1 in T.grid(n, m):
            with T.sblock("scale"):
                vn, vm = T.axis.remap("SS", [i0, i1])
                y[vn, vm] = T.Cast("float32", acc[vn, vm]) * scale[vm] + bias[vm]

    return lut_lookup_i8


def kernel_func(spec: KernelSpec) -> tirx.PrimFunc:
    return encode_func(spec) if isinstance(spec, EncodeSpec) else lookup_func(spec)
