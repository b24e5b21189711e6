"""Models by name from timm or torchvision, never with pretrained weights (no hub downloads)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..convert import LUTConfigError, convert_
from .config import ConfigError, ModelConfig, RunConfig
from .train.checkpoint import load_checkpoint

MODEL_SOURCES: dict[str, Callable[..., nn.Module]] = {}


def register_source(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODEL_SOURCES[name] = fn
        return fn
    return wrap


@register_source("timm")
def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.name: {name!r} is not a timm model (see timm.list_models())")
    return timm.create_model(name, pretrained=False, **kwargs)


@register_source("torchvision")
def _torchvision(name: str, **kwargs) -> nn.Module:
    from torchvision import models

    if name not in models.list_models():
        raise ConfigError(f"model.name: {name!r} is not a torchvision model (see torchvision.models.list_models())")
    return models.get_model(name, weights=None, **kwargs)


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.source:cfg.name`` with ``cfg.kwargs``; ``num_classes`` comes from the data unless given."""
    kwargs = {"num_classes": num_classes, **cfg.kwargs}
    kwargs.pop("pretrained", None)
    return MODEL_SOURCES[cfg.source](cfg.name, **kwargs)


def load_state(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """A state dict from ``path``: a bare state dict or a checkpoint holding one under ``key``."""
    obj = load_checkpoint(Path(path))
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: not a state dict nor a checkpoint with a {key!r} state dict")
    return obj


def load_weights(model: nn.Module, path: str | Path, key: str = "model") -> nn.Module:
    """Load a checkpoint into ``model`` (strict), with a one-line error when it does not fit."""
    state = load_state(path, key)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # checkpoints saved from DDP wrappers
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:3]
        raise ConfigError(f"{path}: does not fit the configured model: {' '.join(first)}") from None
    return model


def check_conversion(cfg: RunConfig, where: str) -> None:
    """Dry-run the conversion on a ``meta``-device model so bad C/K/V fail at load time."""
    try:
        lut_cfg = cfg.lut_config()
    except (LUTConfigError, TypeError) as err:
        raise ConfigError(f"{where}: {_lut_key(err)}: {err}") from None
    try:
        with torch.device("meta"):
            model = create_model(cfg.model, num_classes=10)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - third-party constructors raise anything
        raise ConfigError(f"{where}: model: cannot build {cfg.model.source}:{cfg.model.name} "
                          f"with kwargs {cfg.model.kwargs}: {err}") from None
    try:
        convert_(model, lut_cfg)
    except LUTConfigError as err:
        raise ConfigError(f"{where}: {_lut_key(err)}: {err}") from None


def _lut_key(err: LUTConfigError | TypeError) -> str:
    """The ``lut.*`` key a conversion error is about (``LUTConfigError.key``), else ``lut``."""
    key = getattr(err, "key", None)
    return f"lut.{key}" if key else "lut"
