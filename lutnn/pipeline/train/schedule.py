"""Optimiser with separate learning rates for LUT parameters, and a warm-up + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig

LUT_PARAM_NAMES = ("prototypes", "log_tau")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: decayed weights, undecayed weights (biases, norms, tokens), LUT prototypes/tau.

    Prototypes and temperature get ``proto_lr`` and no weight decay: decay would pull the
    prototypes towards zero, away from the activations they must match.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "weights_no_decay": [], "prototypes": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in LUT_PARAM_NAMES:
            groups["prototypes"].append(p)
        elif p.ndim <= 1 or name in skip:
            groups["weights_no_decay"].append(p)
        else:
            groups["weights"].append(p)
    proto_lr = cfg.proto_lr if cfg.proto_lr is not None else cfg.lr
    spec = {
        "weights": (cfg.lr, cfg.weight_decay),
        "weights_no_decay": (cfg.lr, 0.0),
        "prototypes": (proto_lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": spec[name][0], "weight_decay": spec[name][1]}
        for name, params in groups.items() if params
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class WarmupCosine:
    """LR multiplier per optimiser step: linear warm-up to 1, then cosine down to ``floor``."""

    def __init__(self, total_steps: int, warmup_steps: int, floor: float) -> None:
        self.total, self.warmup, self.floor = max(1, total_steps), min(warmup_steps, total_steps), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int):
    fn = WarmupCosine(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
