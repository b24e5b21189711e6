"""Stateless LUT math shared by every LUT layer.

Shapes: ``x`` is ``[N, D]`` (rows to multiply), ``prototypes`` is ``[C, K, V]`` with
``D == C * V``, ``weight`` is ``[M, D]`` (``nn.Linear`` layout), ``table`` is ``[C, K, M]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native


def split_subvectors(x: Tensor, num_codebooks: int) -> Tensor:
    """``[N, D] -> [C, N, V]`` so every codebook is one batch of a batched matmul."""
    n, d = x.shape
    return x.reshape(n, num_codebooks, d // num_codebooks).transpose(0, 1)


def squared_distances(x: Tensor, prototypes: Tensor) -> Tensor:
    """Squared L2 distance of every sub-vector to every prototype, ``[C, N, K]``.

    Uses ``|x|^2 - 2 x.p + |p|^2`` so the work is one ``baddbmm`` instead of a
    ``[C, N, K, V]`` difference tensor.
    """
    xs = split_subvectors(x, prototypes.shape[0])  # [C, N, V]
    x_sq = xs.pow(2).sum(-1, keepdim=True)  # [C, N, 1]
    p_sq = prototypes.pow(2).sum(-1).unsqueeze(1)  # [C, 1, K]
    return torch.baddbmm(x_sq + p_sq, xs, prototypes.transpose(1, 2), alpha=-2.0)


def encode(x: Tensor, prototypes: Tensor) -> Tensor:
    """Index of the nearest prototype per sub-vector, ``[N, C]`` (uint8 when K <= 256).

    Every path that picks codes (inference, the reference and fused STE, the reconstruction
    loss) calls this, so training and inference agree to the code. On CPU in fp32 it runs the
    native one-pass kernel (:mod:`lutnn.layers.native`; the argmin of ``|p|² - 2 x·p``, whose
    rounding differs from the eager distances' only at near-ties), else ``squared_distances``'s argmin.
    """
    if native.usable(x, prototypes):
        codes = native.encode(x, prototypes)
    else:
        codes = squared_distances(x, prototypes).argmin(-1).transpose(0, 1)
    return codes.to(torch.uint8) if prototypes.shape[1] <= 256 else codes


def soft_assignment(dist: Tensor, log_tau: Tensor) -> Tensor:
    """``softmax(-dist / tau)``: the differentiable surrogate of argmin."""
    return torch.softmax(-dist / log_tau.exp(), dim=-1)


def ste_assignment(dist: Tensor, log_tau: Tensor, codes: Tensor) -> Tensor:
    """Hard one-hot of ``codes [N, C]`` in the forward value, soft-argmin gradient in the backward.

    ``hard + soft - soft.detach()`` is exactly ``hard`` in floating point, so the
    training forward and the table lookup produce the same numbers.
    """
    soft = soft_assignment(dist, log_tau)
    hard = F.one_hot(codes.long().T, dist.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


def lut_matmul(
    x: Tensor,
    prototypes: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    log_tau: Tensor,
    hard: bool = True,
) -> Tensor:
    """Training-time LUT product: ``reconstruct(x) @ weight.T + bias``.

    ``hard=True`` is the LUT-NN straight-through estimator; ``hard=False`` is the
    fully soft path (differentiable everywhere, used by ``gradcheck``).
    """
    dist = squared_distances(x, prototypes)
    if hard:
        assign = ste_assignment(dist, log_tau, encode(x.detach(), prototypes.detach()))
    else:
        assign = soft_assignment(dist, log_tau)
    x_hat = torch.bmm(assign, prototypes).transpose(0, 1).reshape(x.shape)  # [N, D]
    return F.linear(x_hat, weight, bias)


def build_table(prototypes: Tensor, weight: Tensor) -> Tensor:
    """``T[c, k, m] = P[c, k] @ W[m, c-block]``, shape ``[C, K, M]``."""
    c, _, v = prototypes.shape
    return torch.einsum("ckv,mcv->ckm", prototypes, weight.reshape(weight.shape[0], c, v))


def table_lookup(codes: Tensor, table: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y[n] = sum_c T[c, codes[n, c]] + b`` as one gather-accumulate (``embedding_bag``).

    No multiplication of activations with weights happens here; the same call runs
    on CPU and GPU.
    """
    c, k, m = table.shape
    offsets = torch.arange(c, device=codes.device, dtype=torch.long) * k
    flat_idx = codes.long() + offsets
    out = F.embedding_bag(flat_idx, table.reshape(c * k, m), mode="sum")
    return out if bias is None else out + bias
