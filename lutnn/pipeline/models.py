"""Models by name from timm, torchvision or lutnn's own small zoo, never with pretrained weights (no hub downloads).

lutnn's own models (``model.source: lutnn``) are the architectures of the LUT literature that the
hubs do not ship, e.g. the ResNet-9 that halutmatmul reports CIFAR-10 results on.
"""
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


LUTNN_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    LUTNN_MODELS[fn.__name__] = fn
    return fn


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """Page's ResNet-9 (DAWNBench CIFAR-10), the model halutmatmul replaces "every conv but the first" in.

    ``stem`` -> ``layer1`` (conv, pool, residual of two convs) -> ``layer2`` (conv, pool) -> ``layer3``
    (conv, pool, residual) -> global max pool -> ``head``. Widths are ``width * (1, 2, 4, 8)``
    (64 in the original; narrower ones train on a CPU). ``stem_pool`` halves the resolution after the
    stem (28x28 Fashion-MNIST -> 14x14), which makes the table-lookup layers 4x cheaper to train.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_chans: int = 3, stem_pool: bool = False) -> None:
        super().__init__()
        w = width
        self.stem = _conv_bn(in_chans, w, pool=stem_pool)
        self.layer1 = nn.Sequential(_conv_bn(w, 2 * w, pool=True), Residual(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w)))
        self.layer2 = _conv_bn(2 * w, 4 * w, pool=True)
        self.layer3 = nn.Sequential(_conv_bn(4 * w, 8 * w, pool=True), Residual(_conv_bn(8 * w, 8 * w), _conv_bn(8 * w, 8 * w)))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


@register_model
def resnet9(num_classes: int = 10, **kwargs) -> nn.Module:
    return ResNet9(num_classes, **kwargs)


@register_source("lutnn")
def _lutnn(name: str, **kwargs) -> nn.Module:
    if name not in LUTNN_MODELS:
        raise ConfigError(f"model.name: {name!r} is not a lutnn model; known: {sorted(LUTNN_MODELS)}")
    return LUTNN_MODELS[name](**kwargs)


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.source:cfg.name`` with ``cfg.kwargs``; ``num_classes`` comes from the data unless given."""
    kwargs = {"num_classes": num_classes, **cfg.kwargs}
    kwargs.pop("pretrained", None)
    return MODEL_SOURCES[cfg.source](cfg.name, **kwargs)


def load_state(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """A state dict from ``path``: a bare state dict or a checkpoint holding one under ``key``.

    For ``key="model"`` a checkpoint's weight EMA (``"ema"``) wins when it has one: those are
    the weights it was validated (and selected as ``best``) with.
    """
    obj = load_checkpoint(Path(path))
    if key == "model" and isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get(key), dict):
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
