"""Fused straight-through estimator: the ``ste`` mode at close to dense training speed.

:func:`lutnn.layers.functional.lut_matmul` (the *reference* path) builds the STE from
autograd primitives: distances, ``argmin``, ``one_hot``, ``softmax``, ``hard + soft -
soft.detach()``, a ``[C, N, K] x [C, K, V]`` ``bmm`` and a linear layer; autograd then
keeps several ``[C, N, K]`` tensors alive and replays a dozen small kernels backwards.

Here the same function is one :class:`torch.autograd.Function` with a hand-derived
backward. Forward: the codes are ``encode``'s (the native one-pass encoder on CPU, else
distances in row chunks), and ``y = Σ_c T[c, code_c] + b`` is the table lookup of ``lut`` mode (``T = P Wᵀ`` per codebook,
built each step from the current parameters), so the training forward is bit for bit the
inference forward and within fp32 rounding of the reference's ``x̂ Wᵀ``. What is saved for
backward is the input (``LUTLinear``: its D-major copy ``xᵀ``, which both the native encoder and
the backward read), the parameters and the ``[N, C]`` codes (one byte each). Backward,
with ``g = dL/dy``, ``x̂`` the hard reconstruction, ``s = softmax(z)``, ``z = -dist / τ``:

* ``dW = gᵀ x̂``, ``db = Σ_n g``, ``dx̂ = g W`` (two GEMMs, as in a dense layer);
* ``G[c, k, n] = P[c, k] · dx̂[n, c]``, ``dz = s ⊙ (G - Σ_k s ⊙ G)`` (softmax backward);
* ``d dist = -dz / τ``; since ``Σ_k dz = 0``, ``dx = (2/τ) dz P``;
  ``dP = Σ_n onehot(code)ᵀ dx̂ + (2/τ) (dzᵀ x - P ⊙ Σ_n dz)``; ``d log τ = -Σ dz ⊙ z``.

On CPU in fp32 the soft-assignment part runs in :mod:`lutnn.layers.native`'s kernel, one
pass per 16 rows with everything in registers; the eager form below is its fallback (and the
CUDA path). Distances and ``s`` are recomputed chunk by chunk, so each ``[C, K, chunk]`` block lives
only while its chunk is processed. The backward works D-major (``xᵀ``, ``dx̂ᵀ``: ``[D, n]``)
and K-major (``[C, K, n]``), so a conv's im2col patches and output gradient feed it as
``F.unfold`` and the NCHW gradient lay them out, without transpose copies. :func:`ste_conv2d` applies the same per-chunk math to
``LUTConv2d`` with im2col patches unfolded one group of images at a time (forward and
backward), so no full im2col copy is ever kept.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .functional import build_table, squared_distances, table_lookup

# Elements of one [C, chunk, K] block: ~4 MiB of fp32, so a chunk's distances, soft
# assignment and gradient stay in the L2/L3 cache of a core.
CHUNK_ELEMENTS = 1 << 20


def chunk_rows(num_codebooks: int, num_prototypes: int) -> int:
    """Rows per chunk so one ``[C, rows, K]`` block holds about ``CHUNK_ELEMENTS`` values."""
    return max(1, CHUNK_ELEMENTS // (num_codebooks * num_prototypes))


def _spans(n: int, step: int) -> Iterator[slice]:
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def codes_of(x: Tensor, prototypes: Tensor) -> Tensor:
    """``encode``'s codes ``[N, C]`` int64 of rows ``x [N, D]`` (any strides; D-major is fastest).

    Native: one pass. Eager: ``squared_distances`` in row chunks, so no ``[C, N, K]`` block
    outlives its chunk; ``min(-1).indices`` is ``argmin``'s (first) index, ~20 % faster over an
    inner dimension of K on CPU.
    """
    if native.usable(x, prototypes):
        return native.encode(x, prototypes)
    c, k, _ = prototypes.shape
    codes = torch.empty(x.shape[0], c, dtype=torch.long, device=x.device)
    for rows in _spans(x.shape[0], chunk_rows(c, k)):
        codes[rows] = squared_distances(x[rows], prototypes).min(-1).indices.T
    return codes


def reconstruct(codes: Tensor, prototypes: Tensor) -> Tensor:
    """``x̂[n, c-block] = P[c, codes[n, c]]`` as ``[N, D]`` (one embedding gather)."""
    c, k, v = prototypes.shape
    flat = codes.long() + torch.arange(c, device=codes.device) * k
    return F.embedding(flat, prototypes.reshape(c * k, v)).reshape(codes.shape[0], c * v)


def soft_backward_chunk(
    x_t: Tensor, dx_hat_t: Tensor, prototypes: Tensor, inv_tau: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradient through the soft assignment of one chunk of ``n`` rows, all K-major.

    Takes the chunk D-major (``x_t``, ``dx_hat_t``: ``[D, n]``, the layout ``F.unfold``
    yields) and returns ``(dxᵀ [D, n], dzᵀx [C, K, V], Σ_n dz [C, K], Σ dz ⊙ z)``; ``dx`` is
    final and comes D-major, the layout ``F.fold`` takes; the other terms are summed over
    chunks before :meth:`_Grads.finish` scales them.

    Every ``[C, K, n]`` block keeps the long row dimension innermost: the GEMMs write it as
    their output columns and the softmax and ``Σ_k`` reduce over a non-innermost K, which
    PyTorch vectorises along ``n`` (over an innermost K of 16 it runs short scalar rows).
    ``z`` leaves out ``-|x|²/τ``: a per-row constant changes neither the softmax nor, since
    ``Σ_k dz = 0``, ``Σ dz ⊙ z``; the scale ``1/τ`` rides on the ``[C, K]``-sized operands.
    """
    c, _, v = prototypes.shape
    n = x_t.shape[1]
    xs_t = x_t.reshape(c, v, n)
    z = torch.baddbmm(prototypes.pow(2).sum(-1).unsqueeze(-1) * -inv_tau, prototypes * (2 * inv_tau), xs_t)
    s = torch.softmax(z, dim=1)  # [C, K, n]
    sg = torch.bmm(prototypes, dx_hat_t.reshape(c, v, n)).mul_(s)  # s ⊙ G
    dz = sg.addcmul_(s, sg.sum(1, keepdim=True), value=-1.0)  # s ⊙ (G - Σ_k s ⊙ G)
    dx_t = torch.bmm(prototypes.transpose(1, 2) * (2 * inv_tau), dz).view(c * v, n)
    dz_x = torch.bmm(dz, xs_t.transpose(1, 2))
    return dx_t, dz_x, dz.sum(2), torch.vdot(dz.flatten(), z.flatten())


def soft_backward_fusable(
    x_t: Tensor, dx_hat_t: Tensor, prototypes: Tensor, inv_tau: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`soft_backward_chunk` written as broadcasts and reductions over tiny V and K.

    Eager this is slower (it materialises ``[n, C, K, V]``); under ``torch.compile``
    Inductor fuses it into a few loops (C++ on CPU, Triton on CUDA) that never do.
    """
    n = x_t.shape[1]
    c, k, v = prototypes.shape
    xs, ds = x_t.T.reshape(n, c, 1, v), dx_hat_t.T.reshape(n, c, 1, v)
    z = ((2 * xs - prototypes) * prototypes).sum(-1) * inv_tau  # -(dist - |x|²)/τ, [n, C, K]
    s = torch.softmax(z, dim=-1)
    sg = s * (ds * prototypes).sum(-1)
    dz = sg - s * sg.sum(-1, keepdim=True)
    dx = (dz.unsqueeze(-1) * prototypes).sum(2).reshape(n, c * v) * (2 * inv_tau)
    return dx.T, (dz.unsqueeze(-1) * xs).sum(0), dz.sum(0), (dz * z).sum()


_compiled: dict[str, Callable] = {}


def compiled_soft_backward() -> Callable:
    """The Inductor-compiled chunk backward (compiled once per process, dynamic in rows)."""
    if "soft" not in _compiled:
        _compiled["soft"] = torch.compile(soft_backward_fusable, dynamic=True)
    return _compiled["soft"]


class _Grads:
    """Gradient accumulators over row chunks; ``finish`` scales and combines them once."""

    def __init__(self, prototypes: Tensor, weight: Tensor, needs: tuple[bool, ...], compiled: bool) -> None:
        self.compiled = compiled
        self.native = not compiled and native.usable(prototypes, weight)
        self.need_x, need_p, self.need_w, self.need_b, need_tau = needs
        self.need_soft = self.need_x or need_p or need_tau
        c, k, _ = prototypes.shape
        self.dz_x = torch.zeros_like(prototypes)  # Σ dzᵀ x, [C, K, V]
        self.dz_sum = prototypes.new_zeros(c, k)  # Σ_n dz
        self.dz_dot_z = prototypes.new_zeros(())  # Σ dz ⊙ z
        self.hard = torch.zeros_like(prototypes)  # Σ_n onehot(code)ᵀ dx̂
        self.dw = torch.zeros_like(weight) if self.need_w else None
        self.db = weight.new_zeros(weight.shape[0]) if self.need_b else None

    def rows(self, x_t: Tensor, grad_y_t: Tensor, codes: Tensor, prototypes: Tensor, weight: Tensor,
             inv_tau: Tensor) -> Tensor | None:
        """Accumulate one chunk's gradients from its D-major rows ``x_t [D, n]`` and
        ``grad_y_t [M, n]``; return its ``dxᵀ [D, n]`` (``None`` if not needed)."""
        if self.need_w:
            self.dw.addmm_(grad_y_t, reconstruct(codes, prototypes))
        if self.need_b:
            self.db += grad_y_t.sum(1)
        if not self.need_soft:
            return None
        dx_hat_t = weight.T @ grad_y_t  # [D, n]
        if self.native:  # one pass per 16 rows, D-major so each feature's 16 rows load at once
            dx_t = x_t.new_empty(x_t.shape) if self.need_x else None
            self.dz_dot_z += native.soft_backward(
                x_t.T, dx_hat_t.T, None if dx_t is None else dx_t.T, codes, prototypes, float(inv_tau),
                self.dz_x, self.dz_sum, self.hard)
            return dx_t
        _hard_proto_grad(codes, dx_hat_t, prototypes, self.hard)
        kernel = compiled_soft_backward() if self.compiled else soft_backward_chunk
        dx_t, dz_x, dz_sum, dz_dot_z = kernel(x_t, dx_hat_t, prototypes, inv_tau)
        self.dz_x += dz_x
        self.dz_sum += dz_sum
        self.dz_dot_z += dz_dot_z
        return dx_t if self.need_x else None

    def finish(self, prototypes: Tensor, inv_tau: Tensor) -> tuple[Tensor | None, ...]:
        """``(dP, dW, db, d log τ)``."""
        dp = dtau = None
        if self.need_soft:
            dp = self.hard.add_((self.dz_x - prototypes * self.dz_sum.unsqueeze(-1)) * (2 * inv_tau))
            dtau = -self.dz_dot_z
        return dp, self.dw, self.db, dtau


def _hard_proto_grad(codes: Tensor, dx_hat_t: Tensor, prototypes: Tensor, out: Tensor) -> None:
    """``out += Σ_n onehot(code)ᵀ dx̂``: the gradient through ``x̂ = P[code]``.

    A ``scatter_add`` of the D-major ``dx̂ᵀ [C, V, n]`` into ``[C, V, K]``: ~1.5x faster on CPU
    than an ``index_add`` of ``[n·C, V]`` rows, and it takes ``dx̂`` in the layout the soft path uses.
    """
    c, k, v = prototypes.shape
    n = dx_hat_t.shape[1]
    index = codes.T.long().unsqueeze(1).expand(c, v, n)
    out.transpose(1, 2).scatter_add_(2, index, dx_hat_t.reshape(c, v, n))


def _code_dtype(num_prototypes: int) -> torch.dtype:
    # Saved codes are the only [N, C] tensor kept for backward: one byte each when K <= 256.
    return torch.uint8 if num_prototypes <= 256 else torch.long


class STEMatmul(torch.autograd.Function):
    """``y = x̂ Wᵀ + b`` (as a table lookup) with the LUT-NN STE gradient; the values and
    gradients of ``lut_matmul(..., hard=True)`` within fp32 rounding."""

    @staticmethod
    def forward(ctx, x: Tensor, prototypes: Tensor, weight: Tensor, bias: Tensor | None, log_tau: Tensor,
                compiled: bool = False) -> Tensor:
        ctx.compiled = compiled
        # D-major once: the native encoder loads 16 rows per feature from it, and the backward
        # takes it as is (saved instead of x, so it is made once per step)
        x_t = x.T.contiguous()
        codes = codes_of(x_t.T, prototypes)
        y = table_lookup(codes, build_table(prototypes, weight))
        if bias is not None:
            y += bias  # in place: one [N, M] output at the peak, not two
        ctx.save_for_backward(x_t, prototypes, weight, log_tau, codes.to(_code_dtype(prototypes.shape[1])))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x_t, prototypes, weight, log_tau, codes = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        inv_tau = torch.exp(-log_tau)
        acc = _Grads(prototypes, weight, ctx.needs_input_grad[:5], ctx.compiled)
        dx = x_t.new_empty(x_t.shape[::-1]) if acc.need_x else None
        for rows in _spans(x_t.shape[1], chunk_rows(*prototypes.shape[:2])):
            dx_t = acc.rows(x_t[:, rows], grad_y[rows].T, codes[rows], prototypes, weight, inv_tau)
            if dx is not None:
                dx[rows] = dx_t.T
        return (dx, *acc.finish(prototypes, inv_tau), None)


def ste_matmul(x: Tensor, prototypes: Tensor, weight: Tensor, bias: Tensor | None, log_tau: Tensor,
               compiled: bool = False) -> Tensor:
    """Fused equivalent of ``lut_matmul(x, prototypes, weight, bias, log_tau, hard=True)``;
    ``compiled`` runs the chunk backward through ``torch.compile``."""
    return STEMatmul.apply(x, prototypes, weight, bias, log_tau, compiled)


class STEConv2d(torch.autograd.Function):
    """``LUTConv2d``'s STE over im2col rows, unfolding a few images at a time.

    Forward keeps only the input, the parameters and one byte per (row, codebook); the
    backward unfolds the same image groups again and folds their ``dx`` rows back, so
    peak memory holds one group's patches instead of the whole batch's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, prototypes: Tensor, weight: Tensor, bias: Tensor | None, log_tau: Tensor,
                geometry: tuple, compiled: bool = False) -> Tensor:
        ctx.compiled = compiled
        kernel, dilation, padding, stride, out_hw = geometry
        b, m = x.shape[0], weight.shape[0]
        w2d = weight.reshape(m, -1)
        length = out_hw[0] * out_hw[1]
        codes = torch.empty(b * length, prototypes.shape[0], dtype=_code_dtype(prototypes.shape[1]), device=x.device)
        y = x.new_empty(b, m, length)
        table = build_table(prototypes, w2d)
        for imgs in _image_groups(b, length, prototypes):
            cols = F.unfold(x[imgs], kernel, dilation, padding, stride)  # [g, D, L]
            chunk_codes = codes_of(_d_major(cols).T, prototypes)
            codes[_rows_of(imgs, length)] = chunk_codes.to(codes.dtype)
            y_rows = table_lookup(chunk_codes, table).view(-1, length, m).transpose(1, 2)  # [g, M, L]
            if bias is None:
                y[imgs] = y_rows
            else:  # the bias rides on the copy into NCHW: one pass over the rows, not two
                torch.add(y_rows, bias.view(1, m, 1), out=y[imgs])
        ctx.save_for_backward(x, prototypes, weight, log_tau, codes)
        ctx.geometry = geometry
        return y.view(b, m, *out_hw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, prototypes, weight, log_tau, codes = ctx.saved_tensors
        kernel, dilation, padding, stride, out_hw = ctx.geometry
        needs = ctx.needs_input_grad[:5]
        b, m = x.shape[0], weight.shape[0]
        w2d = weight.reshape(m, -1)
        length = out_hw[0] * out_hw[1]
        grad_y = grad_y.reshape(b, m, length)
        inv_tau = torch.exp(-log_tau)
        acc = _Grads(prototypes, w2d, needs, ctx.compiled)
        dx = torch.empty_like(x) if needs[0] else None
        for imgs in _image_groups(b, length, prototypes):
            cols = F.unfold(x[imgs], kernel, dilation, padding, stride)  # [g, D, L]
            x_t = _d_major(cols)
            dx_t = acc.rows(x_t, _d_major(grad_y[imgs]), codes[_rows_of(imgs, length)], prototypes, w2d, inv_tau)
            if dx is not None:  # [D, g*L] -> fold's [g, D, L]: a view for one image per group
                cols = dx_t.reshape(x_t.shape[0], -1, length).transpose(0, 1)
                dx[imgs] = F.fold(cols, x.shape[2:], kernel, dilation, padding, stride)
        dp, dw, db, dtau = acc.finish(prototypes, inv_tau)
        return dx, dp, None if dw is None else dw.view_as(weight), db, dtau, None, None


def _image_groups(batch: int, length: int, prototypes: Tensor) -> Iterator[slice]:
    return _spans(batch, max(1, chunk_rows(*prototypes.shape[:2]) // length))


def _rows_of(imgs: slice, length: int) -> slice:
    return slice(imgs.start * length, imgs.stop * length)


def _d_major(cols: Tensor) -> Tensor:
    """``[g, D, L] -> [D, g * L]`` (a view for one image per group, as im2col gives it)."""
    return cols[0] if cols.shape[0] == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)


def ste_conv2d(x: Tensor, prototypes: Tensor, weight: Tensor, bias: Tensor | None, log_tau: Tensor,
               kernel_size, dilation, padding, stride, out_hw, compiled: bool = False) -> Tensor:
    """Fused STE convolution; ``weight`` in ``nn.Conv2d`` layout ``[M, Cin, kh, kw]``."""
    geometry = (tuple(kernel_size), tuple(dilation), tuple(padding), tuple(stride), tuple(out_hw))
    return STEConv2d.apply(x, prototypes, weight, bias, log_tau, geometry, compiled)
