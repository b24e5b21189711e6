"""Prototype files: ``safetensors`` keyed by layer name, with a schema version.

Layout: tensor ``"<layer>.prototypes"`` ``[C, K, V]`` and ``"<layer>.log_tau"`` per LUT
layer; metadata ``{"format": "lutnn.prototypes", "schema": "1", "sha256": ...}``. safetensors has
no checksum of its own, so ``sha256`` (over names and bytes) lets a corrupt file fail to load
instead of loading wrong prototypes; files without it load unchecked.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; once written, fsync it and rename it over ``path``.

    Readers (and a re-run after a kill) see the old file or the complete new one, never a
    truncated one: the pipeline skips stages whose output exists, so a half-written output
    would otherwise be trusted forever.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_prototypes(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    tensors = {
        f"{name}.{f}": getattr(layer, f).detach().cpu().contiguous()
        for name, layer in lut_layers(model).items() for f in _FIELDS
    }
    if not tensors:
        raise ValueError("model has no LUT layers to save prototypes of")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "schema": SCHEMA_VERSION, "sha256": _digest(tensors)})
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
    if "sha256" in meta and _digest(tensors) != meta["sha256"]:
        raise PrototypeFileError(f"{path}: corrupt prototype file (sha256 of its tensors does not match)")
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
