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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import functional as LF
from .layers.base import resolve_codebooks
from .progress import progress


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


def _optimal_split(x: Tensor, dim: int) -> tuple[float, float]:
    """``(threshold, loss)`` splitting rows ``x [n, V]`` on ``x[:, dim]`` with minimal summed SSE.

    Left keeps ``x[:, dim] < threshold``. A bucket that cannot be split (fewer than two
    distinct values) gets threshold ``+inf`` (everything left) and its own SSE as loss.
    """
    n = x.shape[0]
    whole = float(((x - x.mean(0)) ** 2).sum()) if n else 0.0
    if n < 2:
        return float("inf"), whole
    order = x[:, dim].argsort()
    xsorted = x[order].double()
    key = xsorted[:, dim]
    cnt = torch.arange(1, n, dtype=torch.float64, device=x.device).unsqueeze(1)  # left sizes 1..n-1
    csum, csq = xsorted.cumsum(0), (xsorted ** 2).cumsum(0)
    left = (csq[:-1] - csum[:-1] ** 2 / cnt).sum(1)
    rsum, rsq = csum[-1] - csum[:-1], csq[-1] - csq[:-1]
    right = (rsq - rsum ** 2 / (n - cnt)).sum(1)
    loss = left + right
    loss[key[1:] <= key[:-1]] = float("inf")  # cannot split between equal values
    best = int(loss.argmin())
    if not torch.isfinite(loss[best]):
        return float("inf"), whole
    return float((key[best] + key[best + 1]) / 2), float(loss[best])


def learn_hash_tree(x: Tensor, levels: int = 4, num_candidates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One codebook's tree on its sub-vectors ``x [N, V]``: ``(split_dims [L],
    thresholds [L, 2**(L-1)], buckets [N])``."""
    n, v = x.shape
    width = 2 ** (levels - 1)
    split_dims = torch.zeros(levels, dtype=torch.long)
    thresholds = torch.full((levels, width), float("inf"), dtype=x.dtype)
    buckets = torch.zeros(n, dtype=torch.long)
    for t in range(levels):
        members = [torch.nonzero(buckets == b).squeeze(1) for b in range(2 ** t)]
        col_loss = sum(((x[m] - x[m].mean(0)) ** 2).sum(0) for m in members if len(m))
        candidates = col_loss.topk(min(num_candidates, v)).indices.tolist()
        best = None
        for dim in candidates:
            splits = [_optimal_split(x[m], dim) for m in members]
            total = sum(loss for _, loss in splits)
            if best is None or total < best[0]:
                best = (total, dim, [thr for thr, _ in splits])
        _, dim, thrs = best
        split_dims[t] = dim
        thresholds[t, : 2 ** t] = torch.tensor(thrs, dtype=x.dtype)
        buckets = 2 * buckets + (x[:, dim] >= thresholds[t, buckets]).long()
    return split_dims, thresholds, buckets


def learn_hash_trees(x: Tensor, num_codebooks: int, levels: int = 4, num_candidates: int = 4) -> HashTrees:
    """Trees for all ``C`` codebooks of rows ``x [N, D]`` (sub-vectors as in :func:`split_subvectors`)."""
    xs = LF.split_subvectors(x, num_codebooks)
    dims, thrs = [], []
    for c in progress(range(num_codebooks), desc="maddness trees", total=num_codebooks):
        d, t, _ = learn_hash_tree(xs[c], levels, num_candidates)
        dims.append(d)
        thrs.append(t)
    return HashTrees(torch.stack(dims).to(x.device), torch.stack(thrs).to(x.device))


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
    ) -> "MaddnessLinear":
        """Learn trees and prototypes on calibration ``rows [N, D]`` for ``y = rows @ weight.T + bias``.

        ``ridge`` (e.g. ``1.0``) switches bucket means for ridge-regressed full-width prototypes.
        """
        if not 1 <= levels <= 8:
            raise ValueError(f"levels must be in [1, 8] so a code fits in uint8, got {levels}")
        d = rows.shape[1]
        if weight.shape[1] != d:
            raise ValueError(f"rows have D={d} but weight is {tuple(weight.shape)} (expected [M, {d}])")
        c, _ = resolve_codebooks(d, num_codebooks, None if num_codebooks else subvec_len, "MaddnessLinear")
        rows = rows.float()
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
    """``nn.Conv2d`` (groups=1) as MADDness over its im2col rows: the conv analogue of
    :class:`MaddnessLinear`, with rows ordered like :meth:`lutnn.LUTConv2d.rows` ``(cin, kh, kw)``."""

    def __init__(self, linear: MaddnessLinear, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("MaddnessConv2d needs groups=1, zeros padding and numeric padding")
        self.linear = linear
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rows: Tensor, **kwargs) -> "MaddnessConv2d":
        """Fit on im2col ``rows [N, Cin*kh*kw]`` of calibration inputs; ``kwargs`` as :meth:`MaddnessLinear.fit`."""
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        return cls(MaddnessLinear.fit(rows, weight, conv.bias, **kwargs), conv)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        h_out, w_out = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)
        )
        patches = torch.nn.functional.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        y = self.linear(patches.transpose(1, 2))  # [B, L, M]
        return y.transpose(1, 2).reshape(b, self.out_channels, h_out, w_out)
