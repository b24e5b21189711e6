"""PyTorch dense CPU baselines a LUT layer or model is compared against.

``fp32`` (``F.linear``), ``bf16`` (weights and activations in bfloat16; AMX/AVX512-BF16
where the CPU has them) and ``int8-dynamic`` (``torch.ao.quantization.quantize_dynamic``,
int8 weights, activations quantised per call). A path that fails on this torch build is
reported as unavailable rather than aborting the comparison.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

DENSE_PATHS = ("fp32", "bf16", "int8-dynamic")


def dense_variant(model: nn.Module, path: str) -> Callable[[Tensor], Tensor] | None:
    """``model`` (eval, CPU) prepared for ``path``; ``None`` when this torch cannot run it."""
    model = copy.deepcopy(model).eval().cpu()
    if path == "fp32":
        return model
    if path == "bf16":
        model = model.to(torch.bfloat16)
        return lambda x: model(x.to(torch.bfloat16)).float()
    if path == "int8-dynamic":
        if isinstance(model, nn.Linear):  # quantize_dynamic swaps children, never the root
            model = nn.Sequential(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        except (RuntimeError, AttributeError, AssertionError):
            return None
    raise ValueError(f"unknown dense path {path!r}; known: {DENSE_PATHS}")
