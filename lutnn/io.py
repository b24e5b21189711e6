"""Prototype files: ``safetensors`` keyed by layer name, with a schema version.

Layout: tensor ``"<layer>.prototypes"`` ``[C, K, V]`` and ``"<layer>.log_tau"`` per LUT
layer; metadata ``{"format": "lutnn.prototypes", "schema": "1"}``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .convert import lut_layers

FORMAT = "lutnn.prototypes"
SCHEMA_VERSION = "1"
_FIELDS = ("prototypes", "log_tau")


class PrototypeFileError(ValueError):
    """A prototype file that does not fit the model; the message names file and layer."""


def save_prototypes(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{f}": getattr(layer, f).detach().cpu().contiguous()
        for name, layer in lut_layers(model).items() for f in _FIELDS
    }
    if not tensors:
        raise ValueError("model has no LUT layers to save prototypes of")
    save_file(tensors, str(path), metadata={"format": FORMAT, "schema": SCHEMA_VERSION})
    return path


def load_prototypes(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load prototypes into the model's LUT layers; returns the layer names loaded."""
    path = Path(path)
    if not path.is_file():
        raise PrototypeFileError(f"{path}: prototype file not found (run prototype_learning.py first)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise PrototypeFileError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise PrototypeFileError(f"{path}: not a lutnn prototype file (metadata {meta})")
    if meta.get("schema") != SCHEMA_VERSION:
        raise PrototypeFileError(f"{path}: schema {meta.get('schema')!r}, this lutnn reads {SCHEMA_VERSION!r}")
    layers = lut_layers(model)
    in_file = {k.rsplit(".", 1)[0] for k in tensors}
    if strict:
        missing, extra = sorted(set(layers) - in_file), sorted(in_file - set(layers))
        if missing or extra:
            raise PrototypeFileError(f"{path}: layers missing from file {missing}, in file but not in model {extra}")
    loaded = []
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in in_file:
                continue
            for f in _FIELDS:
                src, dst = tensors[f"{name}.{f}"], getattr(layer, f)
                if src.shape != dst.shape:
                    raise PrototypeFileError(
                        f"{path}: layer {name!r} {f} has shape {tuple(src.shape)} in the file, "
                        f"{tuple(dst.shape)} in the model (C, K, V differ — same conversion config?)"
                    )
                dst.copy_(src)
            loaded.append(name)
    return loaded
