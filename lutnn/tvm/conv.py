"""``LUTConv2d`` as two TensorIR kernels that work on NCHW tensors directly.

``LUTConv2d`` looks up im2col rows: row features are ordered ``(cin, kh, kw)`` and
sub-vector ``c`` holds features ``c*V .. c*V+V-1`` (``V = kh*kw``: codebook ``c`` is input
channel ``c``'s patch; 1×1 with ``V = 4``: channels ``4c .. 4c+3``). The kernels never
build the ``[B*L, D]`` im2col matrix:

* **encode** (``x [B, Cin, H, W] -> codes [B, C, Q]``). A *pad* stage copies ``x`` once
  into zero-padded planes split by stride phase: plane ``(a, e)`` of channel ``ci`` holds
  ``x_pad[i*sh + a, j*sw + e]`` at ``i*Wg + j``. On that grid feature ``(ci, ki, kj)`` of
  output pixel ``q = oh*Wg + ow`` is plane ``((ki*dh) % sh, (kj*dw) % sw)`` at the fixed
  offset ``q + (ki*dh // sh)*Wg + kj*dw // sw``: every tap is a contiguous vector load
  over ``q``, for any stride, padding and dilation. Encode runs on the whole grid row
  (``Wg >= Wout``, the few extra columns are computed and never read), so output
  pixels sit side by side in SIMD lanes and one prototype's ``|p|^2 - 2 x.p`` (``|x|^2``
  is the same for every prototype and drops out of the argmin) is ``V`` FMAs with the
  prototype scalars broadcast, followed by a vector compare/select for the running argmin.
* **read-accumulate** (``codes -> y [B, M, Hout*Wout]``, i.e. NCHW): a tile of ``rows``
  output pixels x ``cols`` output channels accumulates ``T[c, code, m-tile]`` (fp32, or
  int8 in int16/int32 like :mod:`.kernels`) in registers over the codebooks, then the
  epilogue (``scale * acc + bias``) writes the tile into the channel-major output.

Specs, knobs and tuning records use the same machinery as the linear kernels
(:mod:`.schedules`, :mod:`.tuning`): the conv kernel family is registered there.
:func:`conv_runner` builds both kernels for one input shape and returns a torch callable.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import tvm
from torch import Tensor, nn
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.script import tirx as T
from tvm.target import Target

from ..layers import LUTConv2d, conv_unsupported_reason
from .kernels import INT16_MAX_CODEBOOKS, KERNEL_ATTR, TableDType, accumulator_dtype
from .schedules import KernelFamily, Knobs, _lanes, _vectorize_inner, register_family
from .target import host_target, simd_bytes
from .tuning import TuningDatabase, build_kernel

GRID_ALIGN = 32  # encode grid length is a multiple of this: every pixel-block knob divides it


@dataclass(frozen=True)
class ConvGeometry:
    """Input shape and conv hyper-parameters; derives the phase-plane grid the encode runs on."""

    batch: int
    in_channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, layer: LUTConv2d, x_shape: tuple[int, ...]) -> "ConvGeometry":
        if len(x_shape) != 4 or x_shape[1] != layer.in_channels:
            raise ValueError(f"LUTConv2d({layer.in_channels}, ...) expects [B, {layer.in_channels}, H, W], "
                             f"got {tuple(x_shape)}")
        b, ci, h, w = (int(s) for s in x_shape)
        geom = cls(b, ci, h, w, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding),
                   tuple(layer.dilation))
        if geom.out_h <= 0 or geom.out_w <= 0:
            raise ValueError(f"input {tuple(x_shape)} is smaller than the kernel's field of view")
        return geom

    @property
    def out_h(self) -> int:
        return (self.height + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.width + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1

    def phases(self, axis: int) -> int:
        """Stride phases a tap can fall on (1 when every tap is on phase 0, e.g. 1x1 strided)."""
        s, d, k = self.stride[axis], self.dilation[axis], self.kernel[axis]
        return 1 if all(i * d % s == 0 for i in range(k)) else s

    @property
    def grid_w(self) -> int:
        """Row length of a phase plane: covers every output column plus the widest tap offset."""
        s, d, k = self.stride[1], self.dilation[1], self.kernel[1]
        return max(self.out_w + (k - 1) * d // s, -(-(self.width + 2 * self.padding[1]) // s))

    @property
    def grid_q(self) -> int:
        """Encoded grid positions (output rows x ``grid_w``, rounded up to ``GRID_ALIGN``)."""
        return -(-self.out_h * self.grid_w // GRID_ALIGN) * GRID_ALIGN

    @property
    def plane_len(self) -> int:
        """Floats per phase plane: the grid plus the largest tap offset."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        return self.grid_q + (kh - 1) * dh // sh * self.grid_w + (kw - 1) * dw // sw

    @property
    def tag(self) -> str:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return f"b{self.batch}_i{self.in_channels}x{self.height}x{self.width}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_d{dh}x{dw}"


@dataclass(frozen=True)
class ConvEncodeSpec:
    geom: ConvGeometry
    c: int  # codebooks
    k: int  # prototypes per codebook
    v: int  # sub-vector length

    kind = "conv_encode"

    def __post_init__(self) -> None:
        g = self.geom
        if self.c * self.v != g.in_channels * g.kernel[0] * g.kernel[1]:
            raise ValueError(f"C*V={self.c}*{self.v} != Cin*kh*kw of {g.tag}")

    @property
    def name(self) -> str:
        return f"lut_conv_encode_{self.geom.tag}_c{self.c}_k{self.k}_v{self.v}"


@dataclass(frozen=True)
class ConvLookupSpec:
    batch: int
    c: int  # codebooks
    k: int  # prototypes per codebook
    m: int  # output channels
    out_h: int
    out_w: int
    grid_w: int  # row length of the codes grid written by encode
    grid_q: int  # codes per (batch, codebook)
    table_dtype: TableDType = "float32"

    kind = "conv_lookup"

    @classmethod
    def of(cls, enc: ConvEncodeSpec, m: int, table_dtype: TableDType) -> "ConvLookupSpec":
        g = enc.geom
        return cls(g.batch, enc.c, enc.k, m, g.out_h, g.out_w, g.grid_w, g.grid_q, table_dtype)

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def acc_dtype(self) -> str:
        return accumulator_dtype(self.table_dtype, self.c)

    @property
    def int16_blocks(self) -> int:
        """Codebook blocks summed in int16 before widening into the int32 total: int8 tables
        whose ``C * 127`` overflows int16 still add twice as many lanes per instruction.
        1 = no split (fp32, int16 totals, or no divisor of C gives blocks of >= 16)."""
        if self.acc_dtype != "int32":
            return 1
        fits = [nb for nb in range(2, self.c // 16 + 1)
                if self.c % nb == 0 and self.c // nb <= INT16_MAX_CODEBOOKS]
        return fits[0] if fits else 1

    @property
    def name(self) -> str:
        suffix = "" if self.table_dtype == "float32" else "_i8"
        if self.int16_blocks > 1:  # another kernel than the plain int32 sum: its own tuning records
            suffix += f"_w{self.int16_blocks}"
        return (f"lut_conv_lookup_b{self.batch}_c{self.c}_k{self.k}_m{self.m}_o{self.out_h}x{self.out_w}"
                f"_g{self.grid_w}x{self.grid_q}{suffix}")


# -- kernels (what is computed) -----------------------------------------------------------
def _tap(planes: tirx.Buffer, g: ConvGeometry, v_len: int, vb, vc, vv, vq) -> tirx.PrimExpr:
    """Load of feature ``c*V + v`` of grid position ``q`` from its phase plane."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    f = vc * v_len + vv
    ci, r = f // (kh * kw), f % (kh * kw)
    ki, kj = r // kw, r % kw
    a = ki * dh % sh if g.phases(0) > 1 else 0
    e = kj * dw % sw if g.phases(1) > 1 else 0
    return planes[vb, ci, a, e, vq + ki * dh // sh * g.grid_w + kj * dw // sw]


def conv_encode_func(spec: ConvEncodeSpec) -> tirx.PrimFunc:
    """``(x [B,Cin,H,W], protos_m2 [C,V,K] = -2 P^T, pnorm [C,K] = |P|^2) -> codes [B,C,Q] u8``."""
    g, c, k, v = spec.geom, spec.c, spec.k, spec.v
    b, cin, h, w = g.batch, g.in_channels, g.height, g.width
    pa, pe, wg, q, plen = g.phases(0), g.phases(1), g.grid_w, g.grid_q, g.plane_len
    rows = -(-plen // wg)
    (sh, sw), (ph, pw) = g.stride, g.padding

    @T.prim_func(s_tir=True)
    def lut_conv_encode(
        x: T.Buffer((b, cin, h, w), "float32"),
        protos_m2: T.Buffer((c, v, k), "float32"),
        pnorm: T.Buffer((c, k), "float32"),
        codes: T.Buffer((b, c, q), "uint8"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "conv_encode"})
        planes = T.sblock_alloc_buffer((b, cin, pa, pe, rows * wg), "float32")
        dist = T.sblock_alloc_buffer((b, c, q, k), "float32")
        best = T.sblock_alloc_buffer((b, c, q), "float32")
        for i0, i1, i2, i3, i4, i5 in T.grid(b, cin, pa, pe, rows, wg):
            with T.sblock("pad"):
                vb, vi, va, ve, vr, vw = T.axis.remap("SSSSSS", [i0, i1, i2, i3, i4, i5])
                planes[vb, vi, va, ve, vr * wg + vw] = T.if_then_else(
                    0 <= vr * sh + va - ph and vr * sh + va - ph < h and 0 <= vw * sw + ve - pw
                    and vw * sw + ve - pw < w, x[vb, vi, vr * sh + va - ph, vw * sw + ve - pw], T.float32(0))
        for i0, i1, i2, i3, i4 in T.grid(b, c, q, k, v):
            with T.sblock("dist"):
                vb, vc, vq, vk, vv = T.axis.remap("SSSSR", [i0, i1, i2, i3, i4])
                with T.init():
                    dist[vb, vc, vq, vk] = pnorm[vc, vk]
                dist[vb, vc, vq, vk] = dist[vb, vc, vq, vk] + _tap(planes, g, v, vb, vc, vv, vq) * protos_m2[vc, vv, vk]
        for i0, i1, i2, i3 in T.grid(b, c, q, k):
            with T.sblock("argmin"):
                vb, vc, vq, vk = T.axis.remap("SSSR", [i0, i1, i2, i3])
                with T.init():
                    best[vb, vc, vq] = T.float32("inf")
                    codes[vb, vc, vq] = T.uint8(0)
                # strict '<' keeps the first minimum, like torch.argmin
                codes[vb, vc, vq] = T.Select(dist[vb, vc, vq, vk] < best[vb, vc, vq], T.Cast("uint8", vk),
                                             codes[vb, vc, vq])
                best[vb, vc, vq] = T.min(dist[vb, vc, vq, vk], best[vb, vc, vq])

    return lut_conv_encode


def conv_lookup_func(spec: ConvLookupSpec) -> tirx.PrimFunc:
    """``(codes [B,C,Q], table [C,K,M], scale [M], bias [M]) -> y [B, M, Hout*Wout]``.

    ``y = scale * sum_c T[c, code] + bias``; fp32 tables get ``scale = 1`` from the caller
    so both dtypes share one epilogue (``acc * 1`` is exact).
    """
    b, c, k, m, n, ow, wg, q = (spec.batch, spec.c, spec.k, spec.m, spec.pixels, spec.out_w, spec.grid_w,
                                spec.grid_q)
    acc_t, tab_t = spec.acc_dtype, spec.table_dtype

    @T.prim_func(s_tir=True)
    def lut_conv_lookup(
        codes: T.Buffer((b, c, q), "uint8"),
        table: T.Buffer((c, k, m), tab_t),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer((b, m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "conv_lookup"})
        acc = T.sblock_alloc_buffer((b, n, m), acc_t)
        for i0, i1, i2, i3 in T.grid(b, n, m, c):
            with T.sblock("acc"):
                vb, vn, vm, vc = T.axis.remap("SSSR", [i0, i1, i2, i3])
                with T.init():
                    acc[vb, vn, vm] = T.Cast(acc_t, 0)
                acc[vb, vn, vm] = acc[vb, vn, vm] + T.Cast(
                    acc_t, table[vc, T.Cast("int32", codes[vb, vc, vn // ow * wg + vn % ow]), vm])
        for i0, i1, i2 in T.grid(b, m, n):
            with T.sblock("scale"):
                vb, vm, vn = T.axis.remap("SSS", [i0, i1, i2])
                y[vb, vm, vn] = T.Cast("float32", acc[vb, vn, vm]) * scale[vm] + bias[vm]

    return lut_conv_lookup if spec.int16_blocks == 1 else _conv_lookup_blocked(spec)


def _conv_lookup_blocked(spec: ConvLookupSpec) -> tirx.PrimFunc:
    """int8 tables, ``C*127`` over int16: int16 sums of ``C / nb`` codebooks, widened into int32."""
    b, c, k, m, n, ow, wg, q = (spec.batch, spec.c, spec.k, spec.m, spec.pixels, spec.out_w, spec.grid_w,
                                spec.grid_q)
    nb = spec.int16_blocks
    cb = c // nb

    @T.prim_func(s_tir=True)
    def lut_conv_lookup(
        codes: T.Buffer((b, c, q), "uint8"),
        table: T.Buffer((c, k, m), "int8"),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer((b, m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "conv_lookup"})
        part = T.sblock_alloc_buffer((b, n, m, nb), "int16")
        acc = T.sblock_alloc_buffer((b, n, m), "int32")
        for i0, i1, i2, i3, i4 in T.grid(b, n, m, nb, cb):
            with T.sblock("acc"):
                vb, vn, vm, vj, vc = T.axis.remap("SSSSR", [i0, i1, i2, i3, i4])
                with T.init():
                    part[vb, vn, vm, vj] = T.int16(0)
                part[vb, vn, vm, vj] = part[vb, vn, vm, vj] + T.Cast("int16", table[
                    vj * cb + vc, T.Cast("int32", codes[vb, vj * cb + vc, vn // ow * wg + vn % ow]), vm])
        for i0, i1, i2, i3 in T.grid(b, n, m, nb):
            with T.sblock("widen"):
                vb, vn, vm, vj = T.axis.remap("SSSR", [i0, i1, i2, i3])
                with T.init():
                    acc[vb, vn, vm] = 0
                acc[vb, vn, vm] = acc[vb, vn, vm] + T.Cast("int32", part[vb, vn, vm, vj])
        for i0, i1, i2 in T.grid(b, m, n):
            with T.sblock("scale"):
                vb, vm, vn = T.axis.remap("SSS", [i0, i1, i2])
                y[vb, vm, vn] = T.Cast("float32", acc[vb, vn, vm]) * scale[vm] + bias[vm]

    return lut_conv_lookup


# -- schedules (how) ----------------------------------------------------------------------
ENC_PIXEL_BLOCKS = (8, 16, 32)  # pixels per encode step (one or more SIMD vectors)
CONV_ROW_CHOICES = (1, 2, 4, 6, 7, 8)
CONV_VECTORS_PER_TILE = (1, 2, 4)
CONV_C_BLOCKS = (0, 16, 32, 64)


def _encode_knob_space(spec: ConvEncodeSpec, target: Target) -> list[Knobs]:
    return [Knobs(enc_rows=r, c_tile=t) for r, t in itertools.product(ENC_PIXEL_BLOCKS, (1, 2)) if spec.c % t == 0]


def _encode_default(spec: ConvEncodeSpec, target: Target) -> Knobs:
    """One register of pixels: the V tap vectors + distance + running min fit the register file
    (two registers' worth spills on AVX2's 16 registers for V=9)."""
    return Knobs(enc_rows=max(8, simd_bytes(target) // 4), c_tile=1)


def schedule_conv_encode(sch: Schedule, spec: ConvEncodeSpec, target: Target, knobs: Knobs) -> None:
    """Parallel over (batch, codebook tiles); per step ``enc_rows`` grid pixels sit in vector
    lanes; distances for one prototype are a vector, the running argmin a vector select."""
    pad, dist, am = sch.get_sblock("pad"), sch.get_sblock("dist"), sch.get_sblock("argmin")
    vb, vc, vq, vk = sch.get_loops(am)
    c_o, c_i = sch.split(vc, [None, knobs.c_tile])
    q_o, q_l = sch.split(vq, [None, knobs.enc_rows])
    sch.reorder(vb, c_o, c_i, q_o, vk, q_l)
    codes = sch.cache_write(am, 1, "global")  # write 1 = codes (0 is the running minimum)
    sch.reverse_compute_at(codes, q_o)
    sch.compute_at(dist, vk)
    if spec.v > 1:
        *_, d_q, d_v = sch.get_loops(dist)
        sch.reorder(d_v, d_q)
        sch.unroll(d_v)
    else:  # compute_at leaves no loop for a reduction of extent 1
        d_q = d_v = sch.get_loops(dist)[-1]
    sch.vectorize(d_q)
    sch.vectorize(sch.get_loops(am)[-1])
    sch.vectorize(sch.get_loops(codes)[-1])
    sch.parallel(sch.fuse(vb, c_o))
    sch.decompose_reduction(dist, d_v)
    sch.decompose_reduction(am, sch.get_loops(am)[3])
    # pad: one pass over the input, parallel over (batch, channel); a few % of encode (timed with K=1)
    p_b, p_c, *_ = sch.get_loops(pad)
    sch.parallel(sch.fuse(p_b, p_c))


def _lookup_lanes(spec: ConvLookupSpec, target: Target) -> int:
    int16 = spec.acc_dtype == "int16" or spec.int16_blocks > 1
    return _lanes(spec.m, 2 if int16 else 4, target)


def _lookup_knob_space(spec: ConvLookupSpec, target: Target) -> list[Knobs]:
    lanes = _lookup_lanes(spec, target)
    cols = [lanes * v for v in CONV_VECTORS_PER_TILE if spec.m % (lanes * v) == 0] or [spec.m]
    rows = [r for r in CONV_ROW_CHOICES if spec.pixels % r == 0]
    blocks = [bl for bl in CONV_C_BLOCKS if bl < spec.c and (bl == 0 or spec.c % bl == 0)]
    if spec.int16_blocks > 1:  # the int16 blocks are the codebook blocks
        blocks = [0]
    return [Knobs(rows=r, cols=co, c_block=bl) for r, co, bl in itertools.product(rows, cols, blocks)]


def _lookup_default(spec: ConvLookupSpec, target: Target) -> Knobs:
    """Up to 8 pixels x 2 vectors of channels in registers; 32 codebooks per pass when the
    table slice of all codebooks (C x K x cols) would overflow L1."""
    space = _lookup_knob_space(spec, target)
    rows = max(k.rows for k in space)
    lanes = _lookup_lanes(spec, target)
    cols = max((k.cols for k in space if k.cols <= 2 * lanes), default=space[0].cols)
    c_block = 32 if any(k.c_block == 32 for k in space) else 0
    return Knobs(rows=rows, cols=cols, c_block=c_block)


def schedule_conv_lookup(sch: Schedule, spec: ConvLookupSpec, target: Target, knobs: Knobs) -> None:
    """A ``rows x cols`` tile of (pixels x channels) accumulates in registers over the
    codebooks (``c_block > 0``: ``c_block`` at a time, so the table slice stays in L1);
    the epilogue then writes it channel-major (NCHW)."""
    lanes = _lookup_lanes(spec, target)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("scale")
    vb, vn, vm, *vj, vc = sch.get_loops(acc)
    n_o, n_i = sch.split(vn, [None, knobs.rows])
    m_o, m_i = sch.split(vm, [None, knobs.cols])
    m_v, m_l = sch.split(m_i, [None, lanes])
    if vj:  # int16 block sums, each widened into the int32 tile after its codebooks
        sch.reorder(vb, n_o, m_o, vj[0], vc, n_i, m_v, m_l)
        reduce_at = vc
        widen = sch.get_sblock("widen")
        sch.reverse_compute_at(widen, vj[0])
        sch.reverse_compute_at(out, m_o)
        sch.parallel(sch.fuse(vb, n_o))
        _vectorize_inner(sch, widen, lanes, skip=len(sch.get_loops(widen)) - 1)  # over the tile's channels
        widen_init = sch.decompose_reduction(widen, vj[0])
        _vectorize_inner(sch, widen_init, lanes, skip=len(sch.get_loops(widen_init)) - 1)
    elif knobs.c_block:
        c_o, c_i = sch.split(vc, [None, knobs.c_block])
        sch.reorder(vb, m_o, c_o, n_o, c_i, n_i, m_v, m_l)
        reduce_at = c_o
        sch.reverse_compute_at(out, m_o)
        sch.parallel(sch.fuse(vb, m_o))
    else:
        sch.reorder(vb, n_o, m_o, vc, n_i, m_v, m_l)
        reduce_at = vc
        sch.reverse_compute_at(out, m_o)
        sch.parallel(sch.fuse(vb, n_o))
    sch.unroll(n_i)
    sch.unroll(m_v)
    if lanes > 1:
        sch.vectorize(m_l)
    # epilogue: pixels innermost, so each channel's row of pixels is one contiguous vector
    # store (vectorising over channels would need scatters into the NCHW output)
    e_n = sch.get_loops(out)[-1]
    if knobs.c_block:  # the epilogue runs over all pixels of a channel tile
        sch.vectorize(sch.split(e_n, [None, _lanes(spec.pixels, 4, target)])[1])
    elif knobs.rows > 1:  # (rows = 1 leaves only the channel loop: scalar stores)
        sch.vectorize(e_n)
    init = sch.decompose_reduction(acc, reduce_at)
    _vectorize_inner(sch, init, lanes, skip=len(sch.get_loops(init)) - 2)


def _random_inputs(spec, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if isinstance(spec, ConvEncodeSpec):
        g = spec.geom
        return [rng.standard_normal((g.batch, g.in_channels, g.height, g.width), dtype=np.float32),
                rng.standard_normal((spec.c, spec.v, spec.k), dtype=np.float32),
                rng.standard_normal((spec.c, spec.k), dtype=np.float32),
                np.zeros((g.batch, spec.c, g.grid_q), np.uint8)]
    codes = rng.integers(0, spec.k, (spec.batch, spec.c, spec.grid_q)).astype(np.uint8)
    if spec.table_dtype == "float32":
        table = rng.standard_normal((spec.c, spec.k, spec.m), dtype=np.float32)
    else:
        table = rng.integers(-127, 128, (spec.c, spec.k, spec.m)).astype(np.int8)
    return [codes, table, np.abs(rng.standard_normal(spec.m, dtype=np.float32)),
            rng.standard_normal(spec.m, dtype=np.float32), np.zeros((spec.batch, spec.m, spec.pixels), np.float32)]


register_family(ConvEncodeSpec, KernelFamily(conv_encode_func, _encode_knob_space, _encode_default,
                                             schedule_conv_encode, _random_inputs))
register_family(ConvLookupSpec, KernelFamily(conv_lookup_func, _lookup_knob_space, _lookup_default,
                                             schedule_conv_lookup, _random_inputs))


# -- layer -> kernels ---------------------------------------------------------------------
@dataclass(frozen=True)
class ConvKernelSpecs:
    encode: ConvEncodeSpec
    lookup: ConvLookupSpec


def conv_specs(layer: nn.Module, x_shape: tuple[int, ...]) -> ConvKernelSpecs:
    """Kernel shapes of ``layer`` at input ``x_shape``; a clear error for convs it cannot run."""
    if not isinstance(layer, LUTConv2d):
        reason = conv_unsupported_reason(layer) if isinstance(layer, nn.Conv2d) else None
        raise TypeError(f"conv kernels run LUTConv2d layers, got {type(layer).__name__}"
                        + (f" with {reason}" if reason else ""))
    geom = ConvGeometry.of(layer, x_shape)
    enc = ConvEncodeSpec(geom, layer.num_codebooks, layer.num_prototypes, layer.subvec_len)
    return ConvKernelSpecs(enc, ConvLookupSpec.of(enc, layer.out_features, table_dtype(layer)))


def table_dtype(layer: LUTConv2d) -> TableDType:
    """int8 kernels for per-output-channel int8 tables; fp32 otherwise (per-codebook scales
    are dequantised, as ``QuantizedTable.lookup`` does)."""
    q = layer.quantized_table
    return "int8" if q is not None and q.granularity == "output" else "float32"


def conv_constants(layer: LUTConv2d, table_dtype: TableDType,
                   post: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """The kernels' weight arguments, frozen from the layer as it is now.

    int8 tables with per-codebook scales are dequantised to fp32 (as ``LUTBase`` does).
    ``post = (a, b)``: a per-channel affine map applied after the conv (an eval BatchNorm),
    folded into the epilogue: ``a * (scale * acc + bias) + b = (a * scale) * acc + (a * bias + b)``."""
    with torch.no_grad():
        p = layer.prototypes.detach().float()
        q = layer.quantized_table
        if table_dtype == "int8":
            table, scale = q.values, q.scale.float()
        else:
            table = q.dequantize() if q is not None else layer.table()
            scale = torch.ones(layer.out_features)
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        if post is not None:
            a, b = (t.detach().float() for t in post)
            scale, bias = scale * a, bias * a + b
        consts = {"protos_m2": -2 * p.transpose(1, 2), "pnorm": p.pow(2).sum(-1), "table": table,
                  "scale": scale, "bias": bias.float()}
        return {k: t.detach().contiguous().clone() for k, t in consts.items()}


_COMPILED: dict[tuple, object] = {}


def compiled_kernel(spec, target: Target, db: TuningDatabase | None = None):
    """:func:`.tuning.build_kernel`, compiled once per (shape, target, knobs) in a process:
    the repeated convs of a network share their kernels."""
    knobs = db.knobs(spec, target) if db is not None else None
    key = (spec, str(target), knobs)
    if key not in _COMPILED:
        _COMPILED[key] = build_kernel(spec, target, db)
    return _COMPILED[key]


def conv_runner(layer: LUTConv2d, x_shape: tuple[int, int, int, int], *, target: Target | None = None,
                db: TuningDatabase | None = None, tune_trials: int = 0,
                post: tuple[Tensor, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """``x -> layer(x)`` (eval/LUT numerics) on TVM kernels for one NCHW fp32 input shape
    (``post = (a, b)``: ``a[m] * layer(x) + b[m]``, e.g. a following eval BatchNorm, in the epilogue).

    Tables, prototypes and bias are frozen at build time (rebuild after changing the layer).
    ``tune_trials > 0`` tunes kernels missing from ``db`` (default database when ``db`` is
    None) and records them; tuned knobs in ``db`` are always reused. The callable passes
    tensors through DLPack without copies; each call returns a fresh output tensor.
    """
    from .tuning import tune_kernels

    specs = conv_specs(layer, x_shape)
    target = target or host_target()
    if tune_trials > 0:
        db = tune_kernels([specs.encode, specs.lookup], target, db.path.parent if db else None, tune_trials)
    encode, lookup = (compiled_kernel(s, target, db) for s in (specs.encode, specs.lookup))
    consts = conv_constants(layer, specs.lookup.table_dtype, post)
    g, look = specs.encode.geom, specs.lookup
    codes = tvm.runtime.empty((g.batch, look.c, g.grid_q), "uint8", tvm.cpu())
    protos, pnorm = (tvm.runtime.from_dlpack(consts[k]) for k in ("protos_m2", "pnorm"))
    table, scale, bias = (tvm.runtime.from_dlpack(consts[k]) for k in ("table", "scale", "bias"))
    in_shape = torch.Size((g.batch, g.in_channels, g.height, g.width))
    flat_shape, out_shape = (look.batch, look.m, look.pixels), (look.batch, look.m, look.out_h, look.out_w)

    def run(x: Tensor) -> Tensor:
        if x.shape != in_shape or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"conv kernels built for float32 cpu input {tuple(in_shape)}, got {x.dtype} "
                             f"{x.device.type} {tuple(x.shape)}")
        y = torch.empty(flat_shape)
        encode(x if x.is_contiguous() else x.contiguous(), protos, pnorm, codes)  # torch -> TVM by DLPack
        lookup(codes, table, scale, bias, y)
        return y.view(out_shape)

    run.specs, run.consts = specs, consts  # kept alive with the callable (DLPack views above)
    run.codes = lambda: pixel_codes(torch.from_dlpack(codes), g)  # last call's codes, for checks
    return run


def pixel_codes(grid_codes: Tensor, geom: ConvGeometry) -> Tensor:
    """Encode output ``[B, C, Q]`` (grid layout) as ``[B*Hout*Wout, C]``, the row order of ``LUTConv2d.rows``."""
    b, c = grid_codes.shape[:2]
    valid = grid_codes[:, :, :geom.out_h * geom.grid_w].reshape(b, c, geom.out_h, geom.grid_w)[..., :geom.out_w]
    return valid.permute(0, 2, 3, 1).reshape(-1, c)
