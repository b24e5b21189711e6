"""``nn.MaxPool2d`` on NCHW tensors as a TVM kernel, for :func:`.accelerate.accelerate_`.

Why a non-LUT op here: PyTorch's CPU max-pool on NCHW (``channels_first``) inputs is a
scalar loop; ResNet's stem pool (3x3/2 on 64x112x112) took 6 ms of an accelerated
ResNet-18's ~25 ms at batch 1, 1 thread (docs/conv_kernels.md), more than all 19 LUT
encodes together. The kernel computes the same maxima (same elements, exact, NaNs propagated): a pad pass
writes ``-inf`` borders, then each output row is a max over ``kh*kw`` strided rows of the
padded planes, vectorised along the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import tvm
from torch import Tensor, nn
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.script import tirx as T
from tvm.target import Target

from .accelerate import _aligned
from .schedules import _lanes
from .target import host_target


@dataclass(frozen=True)
class MaxPoolSpec:
    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, pool: nn.MaxPool2d, x_shape: tuple[int, ...]) -> "MaxPoolSpec":
        if pool.return_indices or pool.ceil_mode:
            raise NotImplementedError("max-pool kernel: return_indices and ceil_mode are not supported")
        if len(x_shape) != 4:
            raise ValueError(f"max-pool kernel expects NCHW input, got shape {tuple(x_shape)}")
        pair = nn.modules.utils._pair
        spec = cls(*(int(s) for s in x_shape), pair(pool.kernel_size), pair(pool.stride or pool.kernel_size),
                   pair(pool.padding), pair(pool.dilation))
        if spec.out_h <= 0 or spec.out_w <= 0:
            raise ValueError(f"input {tuple(x_shape)} is smaller than the pooling window")
        return spec

    def _out(self, axis: int) -> int:
        size, k, s, p, d = ((self.height, self.width)[axis], self.kernel[axis], self.stride[axis],
                            self.padding[axis], self.dilation[axis])
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    @property
    def out_h(self) -> int:
        return self._out(0)

    @property
    def out_w(self) -> int:
        return self._out(1)


def _window_max(xp: tirx.Buffer, spec: MaxPoolSpec, vb, vc, vi, vj) -> tirx.PrimExpr:
    """The window's max as PyTorch computes it: any NaN tap makes it NaN."""
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    taps = [xp[vb, vc, vi * sh + ki * dh, vj * sw + kj * dw] for ki in range(kh) for kj in range(kw)]
    out, nan = taps[0], tirx.isnan(taps[0])
    for tap in taps[1:]:  # each operand used once: nested Selects over `out` would grow exponentially
        out, nan = tirx.max(out, tap), tirx.Or(nan, tirx.isnan(tap))
    return tirx.Select(nan, tirx.const(float("nan"), "float32"), out)


def max_pool_func(spec: MaxPoolSpec) -> tirx.PrimFunc:
    """``x [B,C,H,W] -> y [B,C,Hout,Wout]``: ``-inf``-padded copy, then the window max."""
    b, c, h, w = spec.batch, spec.channels, spec.height, spec.width
    ph, pw = spec.padding
    oh, ow, hp, wp = spec.out_h, spec.out_w, h + 2 * ph, w + 2 * pw

    @T.prim_func(s_tir=True)
    def lut_max_pool(x: T.Buffer((b, c, h, w), "float32"), y: T.Buffer((b, c, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        xp = T.sblock_alloc_buffer((b, c, hp, wp), "float32")
        for i0, i1, i2, i3 in T.grid(b, c, hp, wp):
            with T.sblock("pad"):
                vb, vc, vh, vw = T.axis.remap("SSSS", [i0, i1, i2, i3])
                xp[vb, vc, vh, vw] = T.if_then_else(
                    ph <= vh and vh < h + ph and pw <= vw and vw < w + pw, x[vb, vc, vh - ph, vw - pw],
                    T.float32("-inf"))
        for i0, i1, i2, i3 in T.grid(b, c, oh, ow):
            with T.sblock("pool"):
                vb, vc, vi, vj = T.axis.remap("SSSS", [i0, i1, i2, i3])
                y[vb, vc, vi, vj] = _window_max(xp, spec, vb, vc, vi, vj)

    return lut_max_pool


def schedule_max_pool(func: tirx.PrimFunc, spec: MaxPoolSpec, target: Target) -> tirx.PrimFunc:
    """Parallel over (batch, channel); each output row is vectors of window maxes (strided
    loads of the padded rows); a channel's padded copy is written just before, so it is still in cache."""
    sch = Schedule(func)
    pad, pool = sch.get_sblock("pad"), sch.get_sblock("pool")
    vb, vc, vi, vj = sch.get_loops(pool)
    bc = sch.fuse(vb, vc)
    sch.parallel(bc)
    sch.compute_at(pad, bc)
    lanes = _lanes(spec.out_w, 4, target)
    if lanes > 1:
        sch.vectorize(sch.split(vj, [None, lanes])[1])
    p_w = sch.get_loops(pad)[-1]
    sch.vectorize(sch.split(p_w, [None, _lanes(spec.width + 2 * spec.padding[1], 4, target)])[1])
    return sch.mod["main"]


_COMPILED: dict[tuple, Callable] = {}


def max_pool_kernel(spec: MaxPoolSpec, target: Target) -> Callable:
    """The compiled kernel for ``spec`` (once per process and target)."""
    key = (spec, str(target))
    if key not in _COMPILED:
        func = schedule_max_pool(max_pool_func(spec), spec, target)
        _COMPILED[key] = tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]
    return _COMPILED[key]


def max_pool_runner(pool: nn.MaxPool2d, x_shape: tuple[int, ...], *, target: Target | None = None,
                    db=None, tune_trials: int = 0) -> Callable[[Tensor], Tensor]:
    """``x -> pool(x)`` for fp32 NCHW CPU inputs of ``x_shape`` (a :data:`.accelerate.RUNNERS` factory;
    ``db`` and ``tune_trials`` are accepted for the common signature: this kernel has no knobs)."""
    spec = MaxPoolSpec.of(pool, x_shape)
    kernel = max_pool_kernel(spec, target or host_target(torch.get_num_threads()))
    out_shape = (spec.batch, spec.channels, spec.out_h, spec.out_w)

    def run(x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"max-pool kernel takes cpu input, got {x.device.type}")
        y = torch.empty(out_shape)
        kernel(_aligned(x), y)
        return y

    return run
