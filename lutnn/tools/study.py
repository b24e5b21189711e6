"""``lutnn study``: every LUT method side by side, per model, on one dataset's test split.

    lutnn study --config configs/study_fashion.yaml [--set base.data.train_limit=2000 ...] [--models resnet9]
    lutnn study --config configs/study_fashion.yaml --jobs 2     # models in two processes, then the table

For each entry of ``models`` (a run config merged over ``base``) it runs, in order:

* ``dense``            — the dense teacher (trained here, or shared via ``teacher_from``);
* ``maddness``         — MADDness hash trees + tables fitted on calibration rows, no retraining;
* ``kmeans``           — LUT-NN's k-means prototypes, no retraining;
* ``lutnn``            — LUT-NN retraining (hard forward, soft-argmin backward, learned tau);
* ``lutnn_recon``      — the same plus the per-layer reconstruction loss (``recon_weight``);
* ``lutnn_recon_int8`` — ``lutnn_recon`` evaluated with int8 tables.

Training uses the pipeline's stages and run directories (``<output_dir>/<model>/lutnn`` and
``.../recon``), so everything resumes: a stage whose output exists is skipped, and a method's
row is measured once and kept in ``<output_dir>/<model>/rows.json``. Output:
``study.md``, ``study.json`` and ``study.png`` in ``output_dir``.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from ..convert import lut_layers, quantize_tables_
from ..io import load_prototypes
from ..layers import LUTConv2d
from ..maddness import MaddnessConv2d, MaddnessLinear
from ..pipeline.cli import first_line
from ..pipeline.config import ConfigError, parse_section, read_config
from ..pipeline.evaluate import evaluate
from ..pipeline.models import load_weights
from ..pipeline.resolve import config_from_dict
from ..pipeline.runner import Pipeline
from ..pipeline.runs import build_lut

METHODS = {
    "dense": "dense teacher",
    "maddness": "MADDness (no retraining)",
    "kmeans": "LUT, k-means init only",
    "lutnn": "LUT-NN retrained",
    "lutnn_recon": "LUT-NN retrained + recon loss",
    "lutnn_recon_int8": "LUT-NN retrained + recon loss, int8 tables",
}


@dataclass
class MaddnessSettings:
    levels: int = 4  # K = 2**levels buckets
    num_candidates: int = 4
    ridge: float | None = 1.0  # ridge-regressed prototypes (the paper's prototype optimisation); null = bucket means
    max_rows: int = 4096  # calibration rows per layer the trees are fitted on


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"
    base: dict[str, Any] = field(default_factory=dict)  # run config shared by every model
    # name -> run config sections over base, plus optional teacher_from (a model above) and methods
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    recon_weight: float = 1.0  # train.recon_weight of the *_recon methods
    int8_granularity: Literal["output", "codebook"] = "output"
    maddness: MaddnessSettings = field(default_factory=MaddnessSettings)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


@dataclass
class StudyModel:
    name: str
    run: dict[str, Any]  # resolved run-config mapping of the LUT-NN run (no output_dir)
    teacher_from: str | None
    methods: list[str]


def _check_methods(methods: Any, where: str, key: str) -> None:
    if not isinstance(methods, list):
        raise ConfigError(f"{where}: {key}: expected a list of methods, got {methods!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"{where}: {key}: unknown {unknown}; known: {list(METHODS)}")


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> tuple[StudyConfig, list[StudyModel]]:
    """Read and validate a study config: schema, methods, and every model's run config."""
    where = str(path)
    cfg = parse_section(StudyConfig, read_config(path, overrides), where)
    _check_methods(cfg.methods, where, "methods")
    if not cfg.models:
        raise ConfigError(f"{where}: models: give at least one model")
    if cfg.recon_weight <= 0:
        raise ConfigError(f"{where}: recon_weight: must be > 0, got {cfg.recon_weight}")
    m = cfg.maddness
    if not 1 <= m.levels <= 8 or m.num_candidates < 1 or m.max_rows < 2 ** m.levels:
        raise ConfigError(f"{where}: maddness: need 1 <= levels <= 8, num_candidates >= 1, max_rows >= 2**levels")
    models: list[StudyModel] = []
    for name, entry in cfg.models.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: models.{name}: expected a mapping of run config sections")
        entry = dict(entry)
        teacher_from = entry.pop("teacher_from", None)
        methods = entry.pop("methods", cfg.methods)
        _check_methods(methods, where, f"models.{name}.methods")
        run = _merge(cfg.base, entry)
        if teacher_from is not None:
            done = {sm.name: sm for sm in models}
            if teacher_from not in done:
                raise ConfigError(f"{where}: models.{name}.teacher_from: {teacher_from!r} is not a model listed before it")
            if run.get("model") != done[teacher_from].run.get("model"):
                raise ConfigError(f"{where}: models.{name}.teacher_from: model section differs from {teacher_from!r}'s")
        config_from_dict({**run, "output_dir": str(Path(cfg.output_dir) / name)}, f"{where}: models.{name}")
        models.append(StudyModel(name, run, teacher_from, list(methods)))
    return cfg, models


# --------------------------------------------------------------------------- measurements

def model_bytes(model: nn.Module, int8: bool = False) -> int:
    """Inference bytes: LUT/MADDness layers by :func:`~lutnn.tools.profile.table_layer_bytes`, others fp32."""
    from .profile import TABLE_LAYERS, _dense_bytes, table_layer_bytes

    total, skip = 0, set()
    for module in model.modules():
        if isinstance(module, TABLE_LAYERS):
            total += table_layer_bytes(module)[int8]
            skip.update(id(t) for t in (*module.parameters(), *module.buffers()))
    rest = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in skip]
    return total + _dense_bytes(rest)


def to_maddness(teacher: nn.Module, lut_model: nn.Module, rows: Mapping[str, torch.Tensor],
                settings: MaddnessSettings) -> nn.Module:
    """A copy of ``teacher`` whose layers converted in ``lut_model`` are MADDness layers fitted on ``rows``,
    with the same C (sub-vector split) as the LUT layers."""
    model = copy.deepcopy(teacher).cpu()
    kw = dict(levels=settings.levels, num_candidates=settings.num_candidates, ridge=settings.ridge)
    for name, lut in lut_layers(lut_model).items():
        dense = model.get_submodule(name)
        x = rows[name][: settings.max_rows]
        if isinstance(lut, LUTConv2d):
            new = MaddnessConv2d.from_conv(dense, x, num_codebooks=lut.num_codebooks, **kw)
        else:
            new = MaddnessLinear.from_linear(dense, x, num_codebooks=lut.num_codebooks, **kw)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model.eval()


def _history_seconds(path: Path) -> float | None:
    return sum(r["seconds"] for r in json.loads(path.read_text())) if path.is_file() else None


class Study:
    def __init__(self, cfg: StudyConfig, models: list[StudyModel]) -> None:
        self.cfg, self.models = cfg, models
        self.root = Path(cfg.output_dir)
        self._splits: dict[str, Any] = {}

    def pipeline(self, run: Mapping[str, Any], out: Path) -> Pipeline:
        pipe = Pipeline(config_from_dict({**run, "output_dir": str(out)}, str(out), check_model=False))
        key = json.dumps(pipe.cfg.to_dict()["data"], sort_keys=True)
        if key not in self._splits:  # every run of the study reads the data once
            self._splits[key] = pipe.splits
        pipe._splits = self._splits[key]
        return pipe

    # one model --------------------------------------------------------------------------
    def run_model(self, sm: StudyModel) -> list[dict[str, Any]]:
        methods = sm.methods
        mdir = self.root / sm.name
        rows_path, timings_path = mdir / "rows.json", mdir / "timings.json"
        rows = json.loads(rows_path.read_text()) if rows_path.is_file() else {}
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        run = sm.run
        if sm.teacher_from is not None:
            run = _merge(run, {"teacher": {"checkpoint": str(self.root / sm.teacher_from / "lutnn" / "teacher.pt")}})
        base = self.pipeline(run, mdir / "lutnn")
        base.prepare()
        base.stage_teacher()
        if not base.paths.prototypes.is_file():
            start = time.perf_counter()
            base.stage_prototypes()
            timings["kmeans"] = time.perf_counter() - start
        mdir.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=1) + "\n")
        teacher = base.teacher()
        test, dev = base.report_loader(), base.env.device
        split, count = base.splits.report[0], len(base.splits.report[1])

        def record(method: str, model: nn.Module, seconds: float | None, int8: bool = False) -> None:
            base.log(f"[study] {sm.name}: evaluating {method} on the {split} split")
            acc = evaluate(model.to(dev), test, dev, base.env, desc=f"{sm.name} {method}")
            rows[method] = {"model": sm.name, "method": method, "top1": acc.top1, "top5": acc.top5,
                            "train_seconds": seconds, "bytes": model_bytes(model, int8), "split": split,
                            "images": count}
            rows_path.write_text(json.dumps(rows, indent=1) + "\n")

        if "dense" not in rows:
            src = self.root / (sm.teacher_from or sm.name) / "lutnn"
            record("dense", teacher, _history_seconds(src / "history_teacher.json"))
        if "kmeans" in methods and "kmeans" not in rows:
            model = build_lut(base.cfg, teacher)
            load_prototypes(model, base.paths.prototypes)
            record("kmeans", model, timings.get("kmeans"))
        if "maddness" in methods and "maddness" not in rows:
            lut = build_lut(base.cfg, teacher)
            calib = base.calibration_rows(lut)
            start = time.perf_counter()
            model = to_maddness(teacher, lut, calib, self.cfg.maddness)
            record("maddness", model, time.perf_counter() - start)
        if "lutnn" in methods and "lutnn" not in rows:
            base.stage_train(resume=True)
            model = load_weights(build_lut(base.cfg, teacher), base.paths.best)
            record("lutnn", model, _history_seconds(base.paths.history("lut")))
        recon_methods = [m for m in ("lutnn_recon", "lutnn_recon_int8") if m in methods and m not in rows]
        if recon_methods:
            rrun = _merge(run, {"train": {"recon_weight": self.cfg.recon_weight},
                                "teacher": {"checkpoint": str(base.paths.teacher)}})
            recon = self.pipeline(rrun, mdir / "recon")
            recon.prepare()
            recon.stage_teacher()
            if not recon.paths.prototypes.is_file():  # same config and seed: the same k-means result
                shutil.copyfile(base.paths.prototypes, recon.paths.prototypes)
            recon.stage_train(resume=True)
            seconds = _history_seconds(recon.paths.history("lut"))
            model = load_weights(build_lut(recon.cfg, teacher), recon.paths.best)
            if "lutnn_recon" in recon_methods:
                record("lutnn_recon", model, seconds)
            if "lutnn_recon_int8" in recon_methods:
                quantize_tables_(model, self.cfg.int8_granularity)
                record("lutnn_recon_int8", model, seconds, int8=True)
        dense = rows["dense"]["top1"]
        out = []
        for method in ("dense", *[m for m in METHODS if m in methods and m != "dense"]):
            out.append({**rows[method], "delta_top1": rows[method]["top1"] - dense})
        return out

    def run(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for sm in self.models:
            results += self.run_model(sm)
            write_report(self.root, results, self.cfg, self.models)  # a partial report survives a crash
        return results


# --------------------------------------------------------------------------- report

def _describe(sm: StudyModel) -> str:
    m, lut = sm.run.get("model", {}), sm.run.get("lut", {})
    spec = ", ".join(f"{k}={v}" for k, v in lut.items())
    return f"`{m.get('source')}:{m.get('name')}` {m.get('kwargs', {})}; LUT: {spec}"


def findings(results: list[dict[str, Any]]) -> list[str]:
    """Plain-sentence conclusions computed from the rows (the study's "must show" checks)."""
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], {})[r["method"]] = r
    for name, rows in by_model.items():
        best = max((rows[m] for m in ("lutnn", "lutnn_recon") if m in rows), key=lambda r: r["top1"], default=None)
        if best is not None:
            gap = -best["delta_top1"]
            verdict = "within" if gap <= 1.0 else "NOT within"
            side = f"{gap:.2f} points below" if gap >= 0 else f"{-gap:.2f} points above"
            out.append(f"{name}: best retrained LUT ({METHODS[best['method']]}) is {side} dense "
                       f"({verdict} 1.0 point).")
            for base in ("maddness", "kmeans"):
                if base in rows:
                    out.append(f"{name}: retrained LUT beats {METHODS[base]} by {best['top1'] - rows[base]['top1']:.2f} points.")
        if "lutnn" in rows and "lutnn_recon" in rows:
            d = rows["lutnn_recon"]["top1"] - rows["lutnn"]["top1"]
            word = "helps" if d > 0 else "does not help"
            out.append(f"{name}: the reconstruction loss {word} ({d:+.2f} points top-1 vs plain LUT-NN retraining).")
        if "lutnn_recon_int8" in rows and "lutnn_recon" in rows:
            d = rows["lutnn_recon_int8"]["top1"] - rows["lutnn_recon"]["top1"]
            out.append(f"{name}: int8 tables change top-1 by {d:+.2f} points.")
    return out


def study_markdown(results: list[dict[str, Any]], cfg: StudyConfig, models: list[StudyModel]) -> str:
    split = results[0]["split"] if results else "test"
    images = results[0]["images"] if results else 0
    lines = [
        f"| model | method | {split} top-1 (%) | {split} top-5 (%) | Δ top-1 vs dense | training time (s) | size (KiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        delta = "" if r["method"] == "dense" else f"{r['delta_top1']:+.2f}"
        lines.append(f"| {r['model']} | {METHODS[r['method']]} | {r['top1']:.2f} | {r['top5']:.2f} | {delta} | "
                     f"{secs} | {r['bytes'] / 1024:.1f} |")
    lines += ["", "Findings (computed from the table):", ""] + [f"- {f}" for f in findings(results)]
    lines += ["", f"- split: {split}, {images} images; checkpoints selected on the validation split held out "
              "from the training set",
              "- training time: wall seconds of the training epochs including per-epoch validation (dense: teacher "
              "training; k-means: calibration + k-means; MADDness: tree fitting); measured on a shared CPU",
              f"- size: inference bytes (LUT layers: prototypes + fp32 tables + bias, int8 row: int8 tables + scales; "
              f"other layers fp32); reconstruction-loss weight {cfg.recon_weight}; MADDness {asdict(cfg.maddness)}"]
    lines += [f"- {sm.name}: {_describe(sm)}" for sm in models]
    return "\n".join(lines) + "\n"


def plot_study(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(names)), 4))
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, name in enumerate(names):
            row = next((r for r in results if r["model"] == name and r["method"] == method), None)
            if row is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(row["top1"])
        bars = ax.bar(xs, ys, width, label=METHODS[method], color=f"C{j}")
        ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"{results[0]['split']} top-1 (%)")
    low = min(r["top1"] for r in results)
    ax.set_ylim(max(0, low - 10), 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("LUT methods side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(root: Path, results: list[dict[str, Any]], cfg: StudyConfig, models: list[StudyModel]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"rows": results, "findings": findings(results),
                                                 "config": asdict(cfg)}, indent=1) + "\n")
    (root / "study.md").write_text(study_markdown(results, cfg, models))
    plot_study(results, root / "study.png")


def job_groups(models: Sequence[StudyModel], jobs: int) -> list[list[str]]:
    """Model names split into at most ``jobs`` lists for parallel processes.

    A model with ``teacher_from`` runs in the process that trains that teacher (it waits for
    ``teacher.pt``); groups go largest first to the least-loaded process.
    """
    by_name = {sm.name: sm for sm in models}

    def root(sm: StudyModel) -> str:
        while sm.teacher_from is not None and sm.teacher_from in by_name:
            sm = by_name[sm.teacher_from]
        return sm.name

    groups: dict[str, list[str]] = {}
    for sm in models:
        groups.setdefault(root(sm), []).append(sm.name)
    lanes: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(groups))))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(lanes, key=len).extend(group)
    return lanes


def run_jobs(args: argparse.Namespace, cfg: StudyConfig, lanes: list[list[str]]) -> None:
    """One ``lutnn study --models ...`` process per lane, logs in ``<output_dir>/logs/``; raises
    :class:`RunError` naming the log of a process that failed."""
    from ..pipeline.runner import RunError

    logs = Path(cfg.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sets = [arg for kv in args.overrides for arg in ("--set", kv)]
    procs = []
    for lane in lanes:
        log = logs / f"study_{'_'.join(lane)}.log"
        cmd = [sys.executable, "-m", "lutnn", "study", "--config", args.config, *sets, "--models", *lane]
        with log.open("w") as fh:
            procs.append((lane, log, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)))
        print(f"[study] started {' '.join(lane)} (log: {log})", flush=True)
    try:
        failed = []
        for lane, log, proc in procs:
            if proc.wait() != 0:
                failed.append(f"{' '.join(lane)} (exit {proc.returncode}, see {log})")
            print(f"[study] finished {' '.join(lane)}: exit {proc.returncode}", flush=True)
    finally:
        for _, _, proc in procs:  # Ctrl-C: stop the workers too (they resume on the next run)
            if proc.poll() is None:
                proc.terminate()
    if failed:
        raise RunError(f"study: parallel process failed: {'; '.join(failed)}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dense / MADDness / k-means / LUT-NN (+ recon loss, int8) per model, "
                                            "on the test split; writes study.md, study.json, study.png")
    p.add_argument("--config", required=True, help="study YAML (e.g. configs/study_fashion.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set base.data.train_limit=2000 --set methods=[dense,kmeans]")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="run and report only these models (e.g. two processes on disjoint models, then one run "
                        "without --models to assemble the full table from the kept rows)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run the models in up to N parallel processes (a model that shares a teacher runs with "
                        "it; each process uses the config's num_threads), then assemble the table")
    args = p.parse_args(argv)
    from ..convert import LUTConfigError
    from ..pipeline.data import DataError
    from ..pipeline.runner import RunError

    try:
        cfg, models = load_study(args.config, args.overrides)
        if args.models:
            unknown = [m for m in args.models if m not in {sm.name for sm in models}]
            if unknown:
                raise ConfigError(f"{args.config}: --models: unknown {unknown}; the config has {[sm.name for sm in models]}")
            models = [sm for sm in models if sm.name in args.models]
        if args.jobs < 1:
            raise ConfigError(f"--jobs: must be >= 1, got {args.jobs}")
        start = time.perf_counter()
        lanes = job_groups(models, args.jobs)
        if len(lanes) > 1:
            run_jobs(args, cfg, lanes)
        Study(cfg, models).run()
    except (ConfigError, DataError, LUTConfigError, RunError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    root = Path(cfg.output_dir)
    print((root / "study.md").read_text())
    print(f"[study] {root / 'study.md'}, {root / 'study.json'}, {root / 'study.png'} "
          f"({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
