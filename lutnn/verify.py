"""Prove that a converted model computes with its LUT layers: :func:`bypassed_lut_layers`.

A module may skip its children's ``forward`` (fused fast paths, custom kernels reading ``.weight``)
and so silently run dense after conversion. The only reliable test is behavioural: perturb one
layer's prototypes and see whether the model's output moves.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .convert import lut_layers


@torch.no_grad()
def bypassed_lut_layers(model: nn.Module, *inputs: Tensor, seed: int = 0) -> list[str]:
    """Names of LUT layers whose prototypes do not affect ``model(*inputs)`` in eval mode under no_grad.

    First every LUT layer runs ``dense``; then each layer in turn runs its table lookup with its
    prototypes perturbed (noise of their own scale changes every table row, whichever codes are
    picked) while the others stay dense, so nothing downstream is piecewise constant and could absorb
    the change. A layer whose output is still exactly the dense one was bypassed. Eval and no_grad
    are the conditions under which torch's fast paths engage. An empty list means every LUT layer is
    on the path from input to output.
    """
    layers = lut_layers(model)
    if not layers:
        raise ValueError("model has no LUT layers; run lutnn.convert_ first")
    was_training = model.training
    modes = {name: layer.mode for name, layer in layers.items()}
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    bypassed = []
    try:
        for layer in layers.values():
            layer.mode = "dense"
        dense = model(*inputs)
        for name, layer in layers.items():
            p = layer.prototypes
            saved = p.clone()
            p.add_(torch.randn(p.shape, generator=gen).to(p) * (p.float().std().to(p.dtype) + 1e-3))
            layer.mode = "lut"
            if torch.equal(model(*inputs), dense):
                bypassed.append(name)
            layer.mode = "dense"
            p.copy_(saved)
    finally:
        for name, layer in layers.items():
            layer.mode = modes[name]
        model.train(was_training)
    return bypassed
