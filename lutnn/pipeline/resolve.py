"""The one place a run config is resolved: schema (:mod:`.config`), then the registries' own checks.

:mod:`.config` knows types and values only; the dataset and model registries check what needs them
(:func:`.data.check_data_config`, :func:`.models.check_conversion`), so imports point one way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import RunConfig, parse_config, read_config
from .data import check_data_config
from .models import check_conversion


def config_from_dict(data: Mapping[str, Any], where: str = "<config>", check_model: bool = True) -> RunConfig:
    """Validate a config mapping; ``check_model`` dry-runs the conversion on a meta-device model."""
    cfg = parse_config(data, where)
    check_data_config(cfg.data, where)
    if check_model:
        check_conversion(cfg, where)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = (), check_model: bool = True) -> RunConfig:
    """Read, override (``KEY=VALUE`` dotted keys) and validate a YAML run config."""
    return config_from_dict(read_config(path, overrides), str(path), check_model)
