"""The research pipeline as resumable stages over one run directory.

``teacher`` (train or load the dense model) -> ``prototypes`` (calibrate + k-means) ->
``train`` (convert, load prototypes, retrain with optional distillation) -> ``eval``
(top-1/top-5 of all three models on the dataset's test split; the validation split
selects checkpoints). A stage whose output already exists is skipped, so
re-running a crashed command continues where it stopped; training resumes from
``checkpoints/last.pt``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from ..calibrate import capture_rows, init_prototypes, init_prototypes_sequential, init_report_markdown
from .config import ConfigError, RunConfig, config_diff, save_config
from ..convert import convert, lut_layers
from .data import Splits, build_splits, input_size, make_loader, set_epoch
from .models import load_weights
from .evaluate import Accuracy, evaluate, plot_history, results_markdown, write_results
from ..faults import fault_point
from ..io import load_prototypes, save_prototypes, write_text_atomic
from .resolve import load_config
from .runs import RunPaths, build_lut, build_teacher
from .train import FitPaths, fit, init_distributed, load_checkpoint, save_checkpoint, seed_everything
from .train.distributed import DistEnv

STAGES = ("teacher", "prototypes", "train", "eval")


class RunError(RuntimeError):
    """The run directory is in a state the requested stage cannot proceed from."""


class Pipeline:
    """Stages of one run; ``env`` is the (possibly multi-process) execution context."""

    def __init__(self, cfg: RunConfig, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.env = env or init_distributed(cfg.device)
        self.paths = RunPaths(Path(cfg.output_dir))
        self._splits: Splits | None = None

    # -- helpers -----------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = build_splits(self.cfg.data)
        return self._splits

    def loader(self, train: bool):
        ds = self.splits.train if train else self.splits.eval
        return make_loader(ds, self.cfg.data, train, self.cfg.seed, self.env.rank, self.env.world)

    def report_loader(self):
        """Loader of the split final results are reported on (test when the dataset has one)."""
        return make_loader(self.splits.report[1], self.cfg.data, False, self.cfg.seed, self.env.rank, self.env.world)

    def teacher(self) -> torch.nn.Module:
        if not self.paths.teacher.is_file():
            raise RunError(f"{self.paths.teacher}: no teacher yet (run prototype_learning.py or pipeline.py first)")
        return build_teacher(self.cfg, self.splits.num_classes, self.paths.teacher).to(self.env.device).eval()

    def calibration_batches(self):
        """The training loader in epoch 0's order and how many of its batches calibrate (``init.num_batches``)."""
        loader = self.loader(True)
        set_epoch(loader, 0, self.cfg.seed)
        return loader, min(self.cfg.init.num_batches, len(loader))

    def calibration_rows(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Input rows of every LUT layer from the first ``init.num_batches`` training batches of epoch 0."""
        loader, n = self.calibration_batches()
        return capture_rows(model, loader, self.cfg.init.max_rows, n, self.cfg.seed, self.env.device)

    def prepare(self) -> None:
        """Create the run dir and save the resolved config; refuse to mix two configs in one dir."""
        if self.paths.config.is_file():
            old = load_config(self.paths.config, check_model=False)
            diff = config_diff(old, self.cfg)
            if diff:
                raise RunError(
                    f"{self.paths.root}: run dir was made with a different config (keys {', '.join(diff)}); "
                    "use a new output_dir (--set output_dir=...) or delete the run dir"
                )
        self.env.barrier()  # every rank has checked before the file is (re)written
        if self.env.is_main:
            save_config(self.cfg, self.paths.config)
        self.env.barrier()

    # -- stages ------------------------------------------------------------------------
    def stage_teacher(self, resume: bool = True) -> None:
        if self.paths.teacher.is_file():
            self.log(f"[teacher] {self.paths.teacher} exists, skipping")
            return
        seed_everything(self.cfg.seed)
        t = self.cfg.teacher
        weights = Path(t.checkpoint) if t.checkpoint is not None else None
        model = build_teacher(self.cfg, self.splits.num_classes, weights).to(self.env.device)
        if weights is not None:
            self.log(f"[teacher] loaded {weights}")
        else:
            fit(model, self.loader(True), self.loader(False), t,
                FitPaths(self.paths.teacher_last, self.paths.teacher_best, self.paths.history("teacher"),
                         self._tb()),
                self.env, stage="teacher", seed=self.cfg.seed, log_every=self.cfg.log.every_steps, resume=resume)
            load_weights(model, self.paths.teacher_best)  # best validation top-1 (its EMA when on)
        if self.env.is_main:
            save_checkpoint(self.paths.teacher, {"model": model.state_dict()})
        self.env.barrier()

    def stage_prototypes(self) -> None:
        if self.paths.prototypes.is_file():
            self.log(f"[prototypes] {self.paths.prototypes} exists, skipping")
            return
        if self.env.is_main:
            init = self.cfg.init
            model, conversion = convert(self.teacher(), self.cfg.lut_config())
            if init.sequential:
                loader, n = self.calibration_batches()
                reports = init_prototypes_sequential(model, loader, init.max_rows, n, init.backend, init.niter,
                                                     self.cfg.seed, self.env.device)
            else:
                rows = self.calibration_rows(model)
                fault_point("calibrated")
                reports = init_prototypes(model, rows, init.backend, init.niter, self.cfg.seed)
            # the prototype file is written last: its presence is what marks this stage done
            write_text_atomic(self.paths.init_report_json, json.dumps([asdict(r) for r in reports], indent=1) + "\n")
            write_text_atomic(self.paths.init_report_md,
                "# Conversion\n\n" + conversion.to_markdown() + "\n\n# k-means initialisation "
                "(relative output error on calibration rows, before retraining)\n\n"
                + init_report_markdown(reports) + "\n"
            )
            save_prototypes(model, self.paths.prototypes)
            mean_err = sum(r.error_kmeans for r in reports) / len(reports)
            self.log(f"[prototypes] {len(reports)} layers, mean relative error {mean_err:.4f} "
                     f"-> {self.paths.prototypes}, {self.paths.init_report_md}")
        self.env.barrier()

    def stage_train(self, resume: bool) -> torch.nn.Module | None:
        """Retrain the LUT model; returns it (this rank's replica), or None when already finished."""
        last = self.paths.last
        if last.is_file():
            if not resume:
                raise RunError(f"{last} exists: pass --resume to continue that run, or use a new output_dir")
            ckpt = load_checkpoint(last)
            if ckpt["epoch"] >= self.cfg.train.epochs or ckpt.get("stopped_early", False):
                self.log(f"[train] {last} has finished ({ckpt['epoch']}/{self.cfg.train.epochs} epochs), skipping")
                return None
        if not self.paths.prototypes.is_file():
            raise RunError(f"{self.paths.prototypes}: no prototypes yet (run prototype_learning.py first)")
        seed_everything(self.cfg.seed)
        teacher = self.teacher()
        model = build_lut(self.cfg, teacher)
        load_prototypes(model, self.paths.prototypes)
        use_kd = self.cfg.distill.enabled
        fit(model, self.loader(True), self.loader(False), self.cfg.train,
            FitPaths(last, self.paths.best, self.paths.history("lut"), self._tb()),
            self.env, stage="lut", seed=self.cfg.seed, teacher=teacher if use_kd else None,
            distill=self.cfg.distill, log_every=self.cfg.log.every_steps, resume=resume)
        return model

    def stage_eval(self) -> dict[str, Accuracy]:
        p = self.paths
        if p.results_json.is_file() and p.best.is_file() and p.results_json.stat().st_mtime >= p.best.stat().st_mtime:
            self.log(f"[eval] {p.results_json} is up to date, skipping")
            return {k: Accuracy(**v) for k, v in json.loads(p.results_json.read_text()).items() if k != "meta"}
        if not p.best.is_file():
            raise RunError(f"{p.best}: no retrained checkpoint yet (run train.py first)")
        loader, dev = self.report_loader(), self.env.device
        teacher = self.teacher()
        init_model = build_lut(self.cfg, teacher)
        load_prototypes(init_model, p.prototypes)
        retrained = load_weights(build_lut(self.cfg, teacher), p.best)
        results = {}
        for key, model, desc in (("teacher", teacher, "teacher"), ("kmeans_init", init_model, "k-means init"),
                                 ("retrained", retrained, "retrained")):
            fault_point("eval_model")
            results[key] = evaluate(model.to(dev), loader, dev, self.env, desc=f"eval {desc}")
        if self.env.is_main:
            meta = {
                "dataset": f"{self.cfg.data.name} ({self.splits.report[0]} split, {results['teacher'].count} images)",
                "model": f"{self.cfg.model.source}:{self.cfg.model.name} {self.cfg.model.kwargs}",
                "input_size": list(input_size(self.cfg.data)),
                "lut_layers": len(lut_layers(retrained)),
                "checkpoint": "best (highest validation top-1 during retraining"
                              + (", EMA weights)" if self.cfg.train.ema_decay is not None else ")"),
                "distillation": self.cfg.distill.enabled,
                "inference": "model.eval(), LUT mode auto -> hard codes + tables",
            }
            write_results(p.root, results, meta)
            if self.cfg.log.plot:
                plot_history({s: _read_json(p.history(s)) for s in ("teacher", "lut")}, p.curves,
                             {"lut": results["kmeans_init"].top1})
            self.log(results_markdown(results, {}).strip())
        self.env.barrier()
        return results

    def run(self, stages: Sequence[str] = STAGES, resume: bool = True) -> dict[str, Accuracy] | None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise RunError(f"unknown stages {unknown}; known: {list(STAGES)}")
        self.prepare()
        results = None
        for stage in STAGES:
            if stage not in stages:
                continue
            start = time.perf_counter()
            if stage == "teacher":
                self.stage_teacher()
            elif stage == "prototypes":
                self.stage_prototypes()
            elif stage == "train":
                self.stage_train(resume)
            else:
                results = self.stage_eval()
            self.log(f"[{stage}] done in {time.perf_counter() - start:.1f}s")
        return results

    def _tb(self) -> Path | None:
        return self.paths.tensorboard if self.cfg.log.tensorboard else None


def _read_json(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def run_from_config(path: str | Path, overrides: Sequence[str] = (), stages: Sequence[str] = STAGES,
                    resume: bool = True) -> dict[str, Accuracy] | None:
    cfg = load_config(path, overrides)
    return Pipeline(cfg).run(stages, resume)


__all__ = ["ConfigError", "Pipeline", "RunError", "STAGES", "run_from_config"]
