"""Run directories: their layout, and :func:`load_run` to get a finished run's models back.

Layout of ``<run_dir>`` (``output_dir`` in the config)::

    config.yaml                 resolved config (every key, after --set overrides)
    teacher.pt                  dense teacher weights {"model": state_dict}
    prototypes.safetensors      k-means prototypes (lutnn.save_prototypes format)
    init_report.{md,json}       per-layer reconstruction error of the k-means init
    checkpoints/{last,best}.pt  LUT retraining checkpoints (model/optimizer/scheduler/RNG state)
    checkpoints/teacher_{last,best}.pt teacher-training checkpoints (resume; teacher.pt = best)
    history_{teacher,lut}.json  per-epoch metrics; curves.png plots them
    results.{json,md}           top-1/top-5 of teacher, k-means init and retrained LUT model on the
                                test split (the validation split when the dataset has no test split)
    tb/                         tensorboard event files
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from .config import RunConfig
from .resolve import load_config
from ..convert import convert
from .data import build_splits, input_size, make_loader
from .models import create_model, load_weights


@dataclass(frozen=True)
class RunPaths:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    teacher = property(lambda self: self.root / "teacher.pt")
    prototypes = property(lambda self: self.root / "prototypes.safetensors")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last = property(lambda self: self.root / "checkpoints" / "last.pt")
    best = property(lambda self: self.root / "checkpoints" / "best.pt")
    teacher_last = property(lambda self: self.root / "checkpoints" / "teacher_last.pt")
    teacher_best = property(lambda self: self.root / "checkpoints" / "teacher_best.pt")
    results_json = property(lambda self: self.root / "results.json")
    results_md = property(lambda self: self.root / "results.md")
    init_report_md = property(lambda self: self.root / "init_report.md")
    init_report_json = property(lambda self: self.root / "init_report.json")
    tensorboard = property(lambda self: self.root / "tb")
    curves = property(lambda self: self.root / "curves.png")

    def history(self, stage: str) -> Path:
        return self.root / f"history_{stage}.json"

    def checkpoint(self, name: str) -> Path:
        """``"best"``/``"last"`` in ``checkpoints/``, or a path to any checkpoint file."""
        return self.checkpoints / f"{name}.pt" if name in ("best", "last") else Path(name)


def build_teacher(cfg: RunConfig, num_classes: int, weights: Path | None = None) -> nn.Module:
    model = create_model(cfg.model, num_classes)
    return load_weights(model, weights) if weights is not None else model


def build_lut(cfg: RunConfig, teacher: nn.Module) -> nn.Module:
    """A converted copy of ``teacher`` (the teacher itself stays dense)."""
    model, _ = convert(teacher, cfg.lut_config())
    return model


@dataclass
class LoadedRun:
    config: RunConfig
    lut_model: nn.Module
    dense_model: nn.Module
    eval_loader: DataLoader
    num_classes: int
    input_size: tuple[int, int, int]


def load_run(run_dir: str | Path, checkpoint: str = "best") -> LoadedRun:
    """The retrained LUT model (``checkpoint``: ``best``, ``last`` or a file), its teacher and eval data."""
    paths = RunPaths(Path(run_dir))
    cfg = load_config(paths.config, check_model=False)
    splits = build_splits(cfg.data)
    dense = build_teacher(cfg, splits.num_classes, paths.teacher).eval()
    lut = build_lut(cfg, dense)
    ckpt = paths.checkpoint(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint (run train.py on {paths.root} first)")
    load_weights(lut, ckpt).eval()
    return LoadedRun(cfg, lut, dense, make_loader(splits.report[1], cfg.data, train=False), splits.num_classes,
                     input_size(cfg.data))
