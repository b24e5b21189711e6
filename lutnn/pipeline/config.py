"""Run configs: one dataclass schema for every YAML in ``configs/``, validated on load.

    cfg = load_config("configs/default.yaml", overrides=["train.lr=1e-3", "distill.enabled=false"])

Bad input stops with a :class:`ConfigError` whose message names the file and the dotted
key: unknown keys, wrong types, impossible values, a data path that does not exist, and
(by building the model on the ``meta`` device and dry-running the conversion) C/K/V that
do not fit the model's layers.
"""
from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key."""


@dataclass
class DataConfig:
    """Which dataset and how it is fed. ``root`` is required by every dataset but ``digits``."""

    name: str = "digits"  # a key of lutnn.pipeline.data.DATASETS
    root: str | None = None
    image_size: int = 16
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    val_fraction: float = 0.2  # digits, fashion_mnist: held-out share of the training images (validation)
    split_seed: int = 0  # fixed stratified split, independent of the run seed
    train_limit: int | None = None  # use only the first N training samples (tests, smoke runs)
    eval_limit: int | None = None
    augment: Literal["none", "shift", "crop_flip", "timm"] = "none"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ModelConfig:
    """A timm, torchvision or lutnn (``lutnn.pipeline.models.LUTNN_MODELS``) architecture by name;
    ``pretrained`` is always off (no downloads)."""

    source: Literal["timm", "torchvision", "lutnn"] = "timm"
    name: str = "deit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser, schedule and loop settings shared by teacher training and LUT retraining."""

    epochs: int = 10
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    proto_lr: float | None = None  # prototypes and log_tau; None = same as lr
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of each group's peak lr
    clip_grad: float | None = 1.0  # max global grad norm; None = off
    label_smoothing: float = 0.0
    amp: bool = True  # autocast on CUDA only; ignored on CPU
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or its step is skipped
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.999); validated and saved as best; None = off
    early_stop_patience: int | None = None  # stop after N epochs without a better val top-1; None = off
    recon_weight: float = 0.0  # per-layer reconstruction loss of LUT layers (eLUT-NN); 0 = off


@dataclass
class TeacherConfig(OptimConfig):
    """The dense model: loaded from ``checkpoint`` or, when that is null, trained here first."""

    checkpoint: str | None = None


@dataclass
class InitConfig:
    """Prototype initialisation: k-means on input rows captured from calibration batches."""

    backend: Literal["auto", "torch", "faiss", "kmcuda"] = "auto"
    num_batches: int = 8
    max_rows: int = 16384
    niter: int = 25
    sequential: bool = False  # layer by layer, on inputs from the already-converted layers before it


@dataclass
class DistillConfig:
    """Logit distillation from the dense teacher: ``(1-w) * CE + w * T^2 * KL(teacher || student)``."""

    enabled: bool = True
    weight: float = 0.5
    temperature: float = 4.0


@dataclass
class LogConfig:
    every_steps: int = 10  # tensorboard scalars every N optimiser steps
    tensorboard: bool = True
    plot: bool = True  # curves.png at the end of the run


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch intra-op CPU threads; None = torch's default (1 is fastest on a busy CPU)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lut: dict[str, Any] = field(default_factory=dict)  # lutnn.LUTConfig.from_dict
    init: InitConfig = field(default_factory=InitConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def lut_config(self):
        from ..convert import LUTConfig

        return LUTConfig.from_dict(self.lut, where="lut")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _parse_scalar(text: str) -> Any:
    return yaml.load(text, Loader=_Loader) if text.strip() else None


def _apply_override(data: dict[str, Any], item: str, where: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{where}: override {item!r} is not KEY=VALUE (e.g. train.lr=1e-3)")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: override {key!r}: {part!r} is not a section")
    node[parts[-1]] = _parse_scalar(value)


# --------------------------------------------------------------------------- schema

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; nested dataclasses are built recursively."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise fail
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {list(args)}")
        return value
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key, where)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise fail
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise fail
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {dotted}{unknown[0]}; allowed in this section: {names}")
    kwargs = {k: _coerce(v, hints[k], dotted + k, where) for k, v in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------- value checks

def _require(ok: bool, where: str, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key}: {msg}")


def _check_values(cfg: RunConfig, where: str) -> None:
    """Types are checked by the schema; this checks values. Registry checks live in ``resolve``."""
    d = cfg.data
    for key in ("image_size", "batch_size", "eval_batch_size"):
        _require(getattr(d, key) > 0, where, f"data.{key}", f"must be > 0, got {getattr(d, key)}")
    _require(d.num_workers >= 0, where, "data.num_workers", "must be >= 0")
    _require(0 < d.val_fraction < 1, where, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    for key in ("train_limit", "eval_limit"):
        v = getattr(d, key)
        _require(v is None or v > 0, where, f"data.{key}", f"must be > 0 or null, got {v}")
    for key in ("mean", "std"):
        _require(len(getattr(d, key)) == 3, where, f"data.{key}", "must have 3 values (RGB)")
    _require(all(s > 0 for s in d.std), where, "data.std", "values must be > 0")
    _require("pretrained" not in cfg.model.kwargs or not cfg.model.kwargs["pretrained"], where,
             "model.kwargs.pretrained", "pretrained weights are never downloaded; use teacher.checkpoint")
    for section in ("teacher", "train"):
        o: OptimConfig = getattr(cfg, section)
        _require(o.epochs >= 0, where, f"{section}.epochs", f"must be >= 0, got {o.epochs}")
        _require(o.lr > 0, where, f"{section}.lr", f"must be > 0, got {o.lr}")
        _require(o.proto_lr is None or o.proto_lr > 0, where, f"{section}.proto_lr", "must be > 0 or null")
        _require(o.weight_decay >= 0, where, f"{section}.weight_decay", "must be >= 0")
        _require(o.warmup_epochs >= 0, where, f"{section}.warmup_epochs", "must be >= 0")
        _require(0 <= o.min_lr_ratio <= 1, where, f"{section}.min_lr_ratio", "must be in [0, 1]")
        _require(o.clip_grad is None or o.clip_grad > 0, where, f"{section}.clip_grad", "must be > 0 or null")
        _require(0 <= o.label_smoothing < 1, where, f"{section}.label_smoothing", "must be in [0, 1)")
        _require(o.ema_decay is None or 0 < o.ema_decay < 1, where, f"{section}.ema_decay",
                 f"must be in (0, 1) or null, got {o.ema_decay}")
        _require(o.early_stop_patience is None or o.early_stop_patience > 0, where,
                 f"{section}.early_stop_patience", f"must be > 0 or null, got {o.early_stop_patience}")
        _require(o.recon_weight >= 0, where, f"{section}.recon_weight", f"must be >= 0, got {o.recon_weight}")
    t = cfg.teacher.checkpoint
    _require(t is None or Path(t).expanduser().is_file(), where, "teacher.checkpoint", f"file {t!r} does not exist")
    _require(cfg.teacher.recon_weight == 0, where, "teacher.recon_weight",
             "the dense teacher has no LUT layers to reconstruct; set train.recon_weight")
    _require(cfg.train.epochs > 0, where, "train.epochs", "must be > 0")
    _require(cfg.teacher.checkpoint is not None or cfg.teacher.epochs > 0, where, "teacher.epochs",
             "must be > 0 when teacher.checkpoint is null (the teacher is trained here)")
    _require(cfg.init.num_batches > 0, where, "init.num_batches", "must be > 0")
    _require(cfg.init.max_rows > 0, where, "init.max_rows", "must be > 0")
    _require(cfg.init.niter > 0, where, "init.niter", "must be > 0")
    _require(0 <= cfg.distill.weight <= 1, where, "distill.weight", f"must be in [0, 1], got {cfg.distill.weight}")
    _require(cfg.distill.temperature > 0, where, "distill.temperature", "must be > 0")
    _require(cfg.log.every_steps > 0, where, "log.every_steps", "must be > 0")
    _require(cfg.num_threads is None or cfg.num_threads > 0, where, "num_threads", "must be > 0 or null")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, where, "device",
             f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


# --------------------------------------------------------------------------- entry points

def parse_section(cls: type, data: Mapping[str, Any], where: str, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping with the run config's type checks (other tools' configs)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {prefix or 'top level'}: expected a mapping, got {type(data).__name__}")
    return _build(cls, data, prefix, where)


def parse_config(data: Mapping[str, Any], where: str = "<config>") -> RunConfig:
    """Build a :class:`RunConfig` from a mapping, checking types and values (no registries)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(RunConfig, data, "", where)
    _check_values(cfg, where)
    return cfg


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` with ``KEY=VALUE`` dotted-key overrides applied."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(data, item, f"{where} (--set)")
    return data


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    from ..io import write_text_atomic

    return write_text_atomic(path, dump_config(cfg))


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, Mapping) and k not in ("lut", "kwargs"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
