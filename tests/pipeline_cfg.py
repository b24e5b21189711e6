"""A tiny run config for the pipeline tests: real digits data, a 1-block DeiT, a few steps."""
from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(out: Path, **sections) -> dict:
    cfg = {
        "seed": 0,
        "output_dir": str(out),
        "device": "cpu",
        "data": {"name": "digits", "image_size": 8, "batch_size": 32, "eval_batch_size": 64,
                 "train_limit": 128, "eval_limit": 64},
        "model": {"source": "timm", "name": "deit_tiny_patch16_224",
                  "kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "teacher": {"epochs": 2, "lr": 3e-3, "warmup_epochs": 0.5},
        "lut": {"subvec_len": 4, "num_prototypes": 8, "include": ["blocks.*"]},
        "init": {"num_batches": 2, "niter": 5, "backend": "torch"},
        "train": {"epochs": 2, "lr": 1e-3, "proto_lr": 3e-3, "warmup_epochs": 0.5},
        "log": {"every_steps": 1, "plot": True},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
