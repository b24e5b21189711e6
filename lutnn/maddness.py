"""MADDness (Blalock & Guttag, ICML 2021): a training-free LUT baseline.

Where LUT-NN encodes a sub-vector by its nearest k-means prototype (``K*V`` multiply-adds),
MADDness encodes it with a balanced binary **hash tree** of ``L`` levels (``K = 2**L``
buckets, 16 at ``L = 4``): level ``t`` compares one input dimension ``j_t`` — shared by all
nodes of the level — against a per-node threshold, so encoding is ``L`` comparisons and
no multiply. Learning (the paper's Algorithm 2), per codebook, level by level:

1. candidate dimensions: the ``num_candidates`` dimensions with the largest squared
   error summed over the current buckets (the paper's heuristic);
2. for each candidate, every bucket's optimal threshold — the split minimising the
   buckets' summed squared error (SSE over all the sub-vector's dimensions), found
   exactly by sorting and cumulative sums;
3. keep the candidate with the lowest total loss and split every bucket.

Prototypes are the bucket means, optionally refined by ridge regression of the full rows
on the one-hot codes of all codebooks (prototypes then span all ``D`` dimensions — the
paper's "prototype optimisation"). The tables ``T[c, k, :] = P[c, k] @ W.T`` have
lutnn's ``[C, K, M]`` layout, so :func:`lutnn.layers.functional.table_lookup` does the
lookup.

``lutnn maddness`` (:mod:`lutnn.tools.maddness_compare`) compares it with the k-means/argmin
encoder on real activations (a small MLP trained on sklearn's digits).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .layers import functional as LF
from .layers.base import resolve_codebooks
from .layers.conv import (_resolve_padding, conv_output_size, conv_unsupported_reason, default_conv_subvec_len,
                          im2col)


@dataclass
class HashTrees:
    """One tree per codebook. ``split_dims [C, L]`` (index inside the sub-vector) and
    ``thresholds [C, L, 2**(L-1)]`` (level ``t`` uses its first ``2**t`` nodes)."""

    split_dims: Tensor
    thresholds: Tensor

    @property
    def num_codebooks(self) -> int:
        return self.split_dims.shape[0]

    @property
    def levels(self) -> int:
        return self.split_dims.shape[1]

    def encode(self, x: Tensor) -> Tensor:
        """Bucket per row and codebook, ``[N, C]`` uint8: ``L`` gathers and comparisons."""
        n, c = x.shape[0], self.num_codebooks
        xs = x.reshape(n, c, -1)
        rows = torch.arange(c, device=x.device)
        idx = torch.zeros(n, c, dtype=torch.long, device=x.device)
        for t in range(self.levels):
            vals = xs.gather(2, self.split_dims[:, t].view(1, c, 1).expand(n, c, 1)).squeeze(2)
            idx = 2 * idx + (vals >= self.thresholds[rows, t, idx]).long()
        return idx.to(torch.uint8)


# Elements per [codebooks, candidates, rows, V] float64 block: codebooks are learned in chunks
# this large so memory stays bounded (~32 MiB) whatever C and N are.
_CHUNK_ELEMENTS = 1 << 22


def _segment_sums(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """Per-segment sums of ``values [..., N, *]`` for ids ``segments [..., N]`` -> ``[..., S, *]``."""
    shape = (*segments.shape[:-1], num_segments, *values.shape[segments.dim():])
    index = segments.reshape(*segments.shape, *[1] * (values.dim() - segments.dim())).expand_as(values)
    return values.new_zeros(shape).scatter_add_(segments.dim() - 1, index, values)


def best_splits(x: Tensor, buckets: Tensor, num_buckets: int, dims: Tensor) -> tuple[Tensor, Tensor]:
    """Every bucket's optimal threshold on each candidate dimension, all codebooks at once.

    ``x [C, N, V]`` sub-vectors, ``buckets [C, N]`` their current bucket, ``dims [C, P]``
    candidate dimensions. Returns ``thresholds [C, P, B]`` and ``loss [C, P]``, the summed SSE
    (over all ``V`` dimensions) of the ``2B`` children. Left keeps ``x[:, dim] < threshold``. A
    bucket that cannot be split (fewer than two distinct values) gets ``+inf`` (all left) and
    its own SSE as loss.

    Rows are sorted by ``(bucket, value)`` so each bucket is a contiguous run, and one segmented
    prefix sum gives every split's left sum ``L`` (the right one is ``T - L``, ``T`` the bucket's
    total). A bucket's SSE after a split is ``sum ||x||^2 - ||L||^2 / n_L - ||R||^2 / n_R``, so the
    best split maximises the last two terms: four ``[C, P, N, V]`` passes per level, no per-bucket loop.
    """
    c, n, v = x.shape
    p, dev = dims.shape[1], x.device
    x = x.double()
    keys = x.gather(2, dims.unsqueeze(1).expand(c, n, p)).transpose(1, 2).contiguous()  # [C, P, N]
    order = keys.argsort(dim=2, stable=True)
    order = order.gather(2, buckets.gather(1, order.view(c, -1)).view(c, p, n).argsort(dim=2, stable=True))
    key, bucket = keys.gather(2, order), buckets.gather(1, order.view(c, -1)).view(c, p, n)
    counts = _segment_sums(torch.ones_like(key), bucket, num_buckets)  # [C, P, B]
    start = counts.cumsum(2) - counts  # each bucket's first sorted row
    total = _segment_sums(x, buckets, num_buckets)  # [C, B, V], the same for every candidate
    # segmented prefix sums: at each bucket's first row subtract the previous bucket's total (the
    # running sum there; empty buckets add zero at their successor's row), then one cumsum
    xs = x.reshape(c * n, v).index_select(0, (order + torch.arange(c, device=dev).view(c, 1, 1) * n).reshape(-1))
    first_row = (start.long().clamp_max(n - 1) + torch.arange(c * p, device=dev).view(c, p, 1) * n).reshape(-1)
    previous = torch.cat([total.new_zeros(c, 1, v), total[:, :-1]], 1)  # [C, B, V]
    shift = previous.unsqueeze(1).expand(c, p, num_buckets, v).reshape(-1, v)
    left = xs.index_add_(0, first_row, shift, alpha=-1).view(c, p, n, v).cumsum_(2)  # split after sorted row i
    # ||R||^2 = ||T||^2 - 2 L.T + ||L||^2 with T the bucket's total: no per-row copy of T
    left_sq = torch.linalg.vector_norm(left, dim=3) ** 2
    left_t = (left @ total.transpose(1, 2).unsqueeze(1)).gather(3, bucket.unsqueeze(3)).squeeze(3)
    right_sq = (total * total).sum(2).gather(1, bucket.view(c, -1)).view(c, p, n) - 2 * left_t + left_sq
    n_left = torch.arange(1, n + 1, device=dev, dtype=torch.float64) - start.gather(2, bucket)
    n_right = counts.gather(2, bucket) - n_left
    gain = left_sq / n_left + right_sq / n_right.clamp_min(1)
    valid = torch.zeros_like(gain, dtype=torch.bool)
    valid[..., :-1] = (bucket[..., 1:] == bucket[..., :-1]) & (key[..., 1:] > key[..., :-1])
    gain = gain.masked_fill(~valid, float("-inf"))

    best = gain.new_full((c, p, num_buckets), float("-inf")).scatter_reduce(2, bucket, gain, "amax")
    pos = torch.arange(n, device=dev).expand(c, p, n)
    at_best = valid & (gain == best.gather(2, bucket))
    first = torch.full_like(best, n, dtype=torch.long).scatter_reduce(2, bucket, pos.masked_fill(~at_best, n), "amin")
    splittable = first < n
    i = first.clamp_max(n - 2)
    thresholds = torch.where(splittable, (key.gather(2, i) + key.gather(2, i + 1)) / 2, float("inf"))
    unsplit = (total * total).sum(2).unsqueeze(1) / counts.clamp_min(1)
    return thresholds, (x * x).sum((1, 2)).unsqueeze(1) - torch.where(splittable, best, unsplit).sum(2)


def _learn_trees(xs: Tensor, levels: int, num_candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """Trees of codebooks ``xs [C, N, V]`` learned together, level by level (see the module doc)."""
    c, n, v = xs.shape
    rows = torch.arange(c, device=xs.device)
    split_dims = torch.zeros(c, levels, dtype=torch.long, device=xs.device)
    thresholds = torch.full((c, levels, 2 ** (levels - 1)), float("inf"), dtype=xs.dtype, device=xs.device)
    buckets = torch.zeros(c, n, dtype=torch.long, device=xs.device)
    x64 = xs.double()
    for t in range(levels):
        width = 2 ** t
        counts = _segment_sums(torch.ones_like(x64[:, :, 0]), buckets, width).clamp_min(1).unsqueeze(2)
        sums, squares = _segment_sums(x64, buckets, width), _segment_sums(x64 ** 2, buckets, width)
        col_loss = (squares - sums ** 2 / counts).sum(1)  # [C, V]: SSE per dimension over the buckets
        candidates = col_loss.topk(min(num_candidates, v), dim=1).indices
        thrs, loss = best_splits(xs, buckets, width, candidates)
        pick = loss.argmin(1)  # the first candidate with the lowest loss
        dim = candidates[rows, pick]
        split_dims[:, t] = dim
        thresholds[:, t, :width] = thrs[rows, pick].to(xs.dtype)
        values = xs.gather(2, dim.view(c, 1, 1).expand(c, n, 1)).squeeze(2)
        buckets = 2 * buckets + (values >= thresholds[:, t].gather(1, buckets)).long()
    return split_dims, thresholds, buckets


def learn_hash_tree(x: Tensor, levels: int = 4, num_candidates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One codebook's tree on its sub-vectors ``x [N, V]``: ``(split_dims [L],
    thresholds [L, 2**(L-1)], buckets [N])``."""
    dims, thrs, buckets = _learn_trees(x.unsqueeze(0), levels, num_candidates)
    return dims[0], thrs[0], buckets[0]


def learn_hash_trees(x: Tensor, num_codebooks: int, levels: int = 4, num_candidates: int = 4) -> HashTrees:
    """Trees for all ``C`` codebooks of rows ``x [N, D]`` (sub-vectors as in :func:`split_subvectors`).

    Codebooks are learned together in chunks of bounded memory: a few large tensor ops per
    level instead of thousands of tiny ones, whose run time swung 40x on a busy machine.
    """
    xs = LF.split_subvectors(x, num_codebooks)  # [C, N, V]
    _, n, v = xs.shape
    chunk = max(1, _CHUNK_ELEMENTS // (min(num_candidates, v) * n * v))
    parts = [_learn_trees(xs[lo: lo + chunk], levels, num_candidates) for lo in range(0, num_codebooks, chunk)]
    return HashTrees(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def bucket_means(x: Tensor, codes: Tensor, num_buckets: int) -> Tensor:
    """``[C, K, V]`` mean sub-vector per bucket; an empty bucket gets its codebook's mean
    (it is never selected on the fitted rows)."""
    n, c = codes.shape
    xs = LF.split_subvectors(x, c)  # [C, N, V]
    flat = codes.long() + torch.arange(c, device=x.device) * num_buckets  # [N, C]
    sums = torch.zeros(c * num_buckets, xs.shape[2], dtype=x.dtype, device=x.device)
    sums.index_add_(0, flat.T.reshape(-1), xs.reshape(-1, xs.shape[2]))
    counts = torch.bincount(flat.reshape(-1), minlength=c * num_buckets).to(x.dtype).unsqueeze(1)
    means = (sums / counts.clamp_min(1)).view(c, num_buckets, -1)
    empty = (counts == 0).view(c, num_buckets)
    return torch.where(empty.unsqueeze(2), xs.mean(1, keepdim=True), means)


def ridge_prototypes(x: Tensor, codes: Tensor, num_buckets: int, ridge: float) -> Tensor:
    """Full-width prototypes ``[C, K, D]`` minimising ``||X - G P||^2 + ridge * ||P||^2``,
    ``G [N, C*K]`` the one-hot codes of all codebooks (solved in float64)."""
    n, c = codes.shape
    flat = codes.long() + torch.arange(c, device=x.device) * num_buckets
    g = torch.zeros(n, c * num_buckets, dtype=torch.float64, device=x.device)
    g.scatter_(1, flat, 1.0)
    gram = g.T @ g + ridge * torch.eye(c * num_buckets, dtype=torch.float64, device=x.device)
    p = torch.linalg.solve(gram, g.T @ x.double())
    return p.to(x.dtype).view(c, num_buckets, -1)


def build_table_full(prototypes: Tensor, weight: Tensor) -> Tensor:
    """``[C, K, M]`` table from prototypes ``[C, K, V]`` (within their sub-space) or ``[C, K, D]``."""
    if prototypes.shape[2] == weight.shape[1]:
        return torch.einsum("ckd,md->ckm", prototypes, weight)
    return LF.build_table(prototypes, weight)


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads (``None``: unchanged), then restore."""
    saved = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class MaddnessLinear(nn.Module):
    """``nn.Linear`` replaced by a MADDness hash-tree encoder and lookup tables (inference only)."""

    def __init__(self, trees: HashTrees, table: Tensor, bias: Tensor | None, in_features: int) -> None:
        super().__init__()
        self.register_buffer("split_dims", trees.split_dims)
        self.register_buffer("thresholds", trees.thresholds)
        self.register_buffer("table", table)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = in_features, table.shape[2]
        self.num_codebooks, self.num_prototypes = table.shape[0], table.shape[1]

    @property
    def trees(self) -> HashTrees:
        return HashTrees(self.split_dims, self.thresholds)

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        rows: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        num_codebooks: int | None = None,
        subvec_len: int | None = 8,
        levels: int = 4,
        num_candidates: int = 4,
        ridge: float | None = None,
        num_threads: int | None = 1,
    ) -> "MaddnessLinear":
        """Learn trees and prototypes on calibration ``rows [N, D]`` for ``y = rows @ weight.T + bias``.

        ``ridge`` (e.g. ``1.0``) switches bucket means for ridge-regressed full-width prototypes.
        ``num_threads`` pins torch's threads during the fit (restored after): the tree search is
        memory-bound, and one thread keeps it steady when another process holds a core, where
        two OpenMP threads wait on each other at every op (``None`` keeps the caller's setting).
        """
        if not 1 <= levels <= 8:
            raise ValueError(f"levels must be in [1, 8] so a code fits in uint8, got {levels}")
        d = rows.shape[1]
        if weight.shape[1] != d:
            raise ValueError(f"rows have D={d} but weight is {tuple(weight.shape)} (expected [M, {d}])")
        c, _ = resolve_codebooks(d, num_codebooks, None if num_codebooks else subvec_len, "MaddnessLinear")
        rows = rows.float()
        with torch_threads(num_threads):
            trees = learn_hash_trees(rows, c, levels, num_candidates)
            codes = trees.encode(rows)
            k = 2 ** levels
            protos = bucket_means(rows, codes, k) if ridge is None else ridge_prototypes(rows, codes, k, ridge)
            table = build_table_full(protos, weight.float())
        return cls(trees, table, None if bias is None else bias.detach().float(), d)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: Tensor, **kwargs) -> "MaddnessLinear":
        return cls.fit(rows, linear.weight.detach(), linear.bias, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MaddnessLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        y = LF.table_lookup(self.trees.encode(rows), self.table, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, C={self.num_codebooks}, K={self.num_prototypes}, "
                f"levels={self.split_dims.shape[1]}")


class MaddnessConv2d(nn.Module):
    """``nn.Conv2d`` (groups=1) as a :class:`MaddnessLinear` over its im2col rows, as for
    :class:`~lutnn.layers.LUTConv2d`: the conv *is* the linear layer applied to every receptive field."""

    def __init__(self, lut: MaddnessLinear, in_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
        super().__init__()
        self.lut = lut
        self.in_channels, self.out_channels = in_channels, lut.out_features
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, rows: Tensor, **kwargs) -> "MaddnessConv2d":
        """Fit on calibration im2col ``rows [N, Cin*kh*kw]`` (e.g. ``LUTConv2d.rows`` or
        :func:`lutnn.layers.conv.im2col`); ``kwargs`` as for :meth:`MaddnessLinear.fit`. With
        neither ``subvec_len`` nor ``num_codebooks``, V is LUTConv2d's default: one channel's patch."""
        reason = conv_unsupported_reason(conv)
        if reason:
            raise ValueError(f"cannot convert Conv2d: {reason}")
        kernel, dilation = _pair(conv.kernel_size), _pair(conv.dilation)
        if kwargs.get("subvec_len") is None and kwargs.get("num_codebooks") is None:
            kwargs["subvec_len"] = default_conv_subvec_len(conv.in_channels, kernel)
        lut = MaddnessLinear.fit(rows, conv.weight.reshape(conv.out_channels, -1), conv.bias, **kwargs)
        return cls(lut, conv.in_channels, kernel, _pair(conv.stride),
                   _resolve_padding(conv.padding, kernel, dilation), dilation)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MaddnessConv2d expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        b = x.shape[0]
        h_out, w_out = conv_output_size(x.shape[2], x.shape[3], self.kernel_size, self.dilation, self.padding,
                                        self.stride)
        y = self.lut(im2col(x, self.kernel_size, self.dilation, self.padding, self.stride))
        return y.reshape(b, h_out * w_out, self.out_channels).transpose(1, 2).reshape(b, -1, h_out, w_out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")
