"""Per-layer reconstruction loss (eLUT-NN, ASPLOS'24): pull every LUT layer's input towards its codes.

LUT-NN trains prototypes only through the task loss, which reaches them through the
soft-argmin surrogate; when many layers are replaced this signal is weak and noisy.
eLUT-NN adds, per layer, the distance between the layer's input sub-vectors and the
prototypes they are encoded to, which gives every prototype a direct gradient towards the
activations it stands for (and the activations one towards their prototypes).

Here the loss of one layer is relative, ``sum ||x - P[code(x)]||^2 / sum ||x||^2`` over the
batch's rows, so one weight fits layers of any activation scale; the training loss adds
``weight * mean over layers``.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ...convert import lut_layers
from ...layers import LUTBase
from ...layers import functional as LF


def reconstruction_error(layer: LUTBase, rows: Tensor) -> Tensor:
    """Differentiable relative squared error of encoding ``rows [N, D]`` with ``layer``'s prototypes."""
    rows = rows.float()
    protos = layer.prototypes
    xs = LF.split_subvectors(rows, layer.num_codebooks)  # [C, N, V]
    codes = LF.encode(rows.detach(), protos.detach()).long().T  # [C, N]: the codes the layer uses
    chosen = protos.gather(1, codes.unsqueeze(-1).expand(-1, -1, protos.shape[2]))  # [C, N, V]
    return (xs - chosen).pow(2).sum() / xs.detach().pow(2).sum().clamp_min(1e-12)


class ReconstructionLoss:
    """Forward pre-hooks on every LUT layer of ``model`` that record its reconstruction error
    while the model is training; :meth:`pop` returns their mean and starts over."""

    def __init__(self, model: nn.Module) -> None:
        self.terms: list[Tensor] = []
        self.handles: list[RemovableHandle] = [
            layer.register_forward_pre_hook(self._hook) for layer in lut_layers(model).values()
        ]
        if not self.handles:
            raise ValueError("reconstruction loss: the model has no LUT layers")

    def _hook(self, layer: LUTBase, args: tuple) -> None:
        if layer.training:
            self.terms.append(reconstruction_error(layer, layer.rows(args[0])))

    def pop(self) -> Tensor:
        if not self.terms:
            raise RuntimeError("reconstruction loss: no LUT layer ran in training mode since the last pop()")
        total = sum(self.terms) / len(self.terms)
        self.terms = []
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
