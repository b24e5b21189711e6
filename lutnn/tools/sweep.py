"""Where compression hurts: per-layer sensitivity, progressive replacement, calibration convergence.

``lutnn sweep <analysis> --config X`` (the analyses of halutmatmul, on lutnn's pipeline):

* ``layers`` — every layer the config converts is replaced **alone**, without retraining, by a
  k-means LUT, MADDness hash trees, and a k-means LUT with int8 tables, for the config's C/K/V
  and an optional grid of V and K. Per layer: shape, MACs saved, held-out output error and the
  model's top-1 with only that layer replaced -> ``layers.{md,json,png}``. ``--suggest BUDGET``
  picks the per-layer settings (or dense) with the largest MAC saving whose summed single-layer
  top-1 drops stay within ``BUDGET`` points, and writes them as a ``lut:`` block (``suggest.yaml``).
* ``progressive`` — layers replaced one group at a time (order: ``sensitivity``, least sensitive
  first by the ``layers`` sweep's k-means drop, or ``front`` to back), each group k-means
  initialised on the inputs it sees behind the already-replaced groups, then a short retrain of
  the whole model; plotted next to the pipeline's all-at-once recipe -> ``progressive.{md,json,png}``.
  Every step is checkpointed, so re-running the command resumes.
* ``calibration`` — top-1 and held-out output error of the no-retrain model (every layer replaced)
  against the number of calibration images, for k-means and MADDness -> ``calibration.{md,json,png}``.
* ``fit-bench`` — ``MaddnessLinear.fit`` timing, steady or not, while another process loads a core.

The dense model is the run's teacher (trained by the pipeline's ``teacher`` stage when the run dir
has none). ``--random-weights`` uses the seeded random initialisation instead (BatchNorm statistics
taken from a few training batches) and measures top-1 *agreement with the dense model's
predictions*: random-weight sensitivity, for architectures whose trained weights cannot be had here.

Errors are relative, ``||f(X) - X W^T|| / ||X W^T||`` over the layer's input rows from held-out
(eval) images, bias excluded. MACs count the layer's matmul per image (``L*D*M`` for ``L`` rows
per image); a k-means LUT keeps its encode distances (``L*D*K``), MADDness encodes with compares.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..calibrate import capture_rows, init_prototypes
from ..convert import LAYER_TYPES, LUTConfig, convert, lut_layers
from ..layers import LUTBase
from ..maddness import MaddnessConv2d, MaddnessLinear
from ..pipeline.cli import emit, first_line

METHODS = ("kmeans", "maddness", "kmeans-int8")
METHOD_LABELS = {"kmeans": "k-means LUT", "maddness": "MADDness", "kmeans-int8": "k-means LUT, int8 tables"}


# --------------------------------------------------------------------------- the dense model and data

@dataclass
class Setup:
    """What every analysis shares: the pipeline, the dense model, its LUT selection and cached eval data."""

    pipe: Any  # lutnn.pipeline.runner.Pipeline
    dense: nn.Module
    lut_config: LUTConfig
    names: list[str]  # layers the config converts, in model order
    eval_batches: list[tuple[Tensor, Tensor]]  # labels: ground truth, or dense predictions (random weights)
    dense_logits: list[Tensor]
    metric: str  # "top-1" or "top-1 agreement with the dense model"
    macs: dict[str, int]  # dense matmul MACs per image of every Linear/Conv2d
    out: Path

    @property
    def device(self) -> torch.device:
        return self.pipe.env.device

    def lut_model(self) -> nn.Module:
        """The dense model with every selected layer converted (dense weights, untrained prototypes)."""
        return convert(self.dense, self.lut_config)[0]

    def accuracy(self, model: nn.Module) -> float:
        return self.evaluate(model)[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(top-1 %, relative logit error ``||z - z_dense|| / ||z_dense||``) on the eval batches. The
        logit error is the continuous measure: it still ranks layers where top-1 saturates."""
        was_training = model.training
        model.eval()
        correct = total = 0
        err = ref = 0.0
        for (x, y), dense in zip(self.eval_batches, self.dense_logits):
            z = model(x)
            correct += int((z.argmax(1) == y).sum())
            total += len(y)
            err += float((z - dense).pow(2).sum())
            ref += float(dense.pow(2).sum())
        model.train(was_training)
        return 100.0 * correct / max(1, total), math.sqrt(err / max(ref, 1e-30))

    def eval_rows(self, max_rows: int) -> dict[str, Tensor]:
        """Held-out input rows of every selected layer (error measurements)."""
        return capture_rows(self.lut_model(), self.eval_batches, max_rows, len(self.eval_batches),
                            self.pipe.cfg.seed, self.device)


def load_setup(args: argparse.Namespace) -> Setup:
    from ..pipeline.resolve import load_config
    from ..pipeline.runner import Pipeline
    from ..pipeline.runs import build_teacher
    from ..pipeline.train import seed_everything

    cfg = load_config(args.config, args.overrides)
    pipe = Pipeline(cfg)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "sweeps"
    out.mkdir(parents=True, exist_ok=True)
    if args.random_weights:
        seed_everything(cfg.seed)
        dense = build_teacher(cfg, pipe.splits.num_classes).to(pipe.env.device)
        calibrate_batchnorm(dense, pipe.loader(True), 4, pipe.env.device)
    else:
        pipe.prepare()
        pipe.stage_teacher()
        dense = pipe.teacher()
    dense.eval().requires_grad_(False)
    lut_config = cfg.lut_config()
    if args.all_layers:
        lut_config = dataclasses.replace(lut_config, include=["*"], exclude=[], overrides={}, strict=False)
    names = convert(dense, lut_config)[1].names
    if not names:
        raise ValueError(f"{args.config}: lut: the config converts no layer")
    loader = pipe.loader(False)
    batches = [(x.to(pipe.env.device), y.to(pipe.env.device)) for x, y in loader]
    if args.eval_limit:
        batches = _limit(batches, args.eval_limit)
    with torch.no_grad():
        logits = [dense(x) for x, _ in batches]
    metric = "top-1"
    if args.random_weights:
        batches = [(x, z.argmax(1)) for (x, _), z in zip(batches, logits)]
        metric = "top-1 agreement with the dense model"
    return Setup(pipe, dense, lut_config, names, batches, logits, metric, dense_macs(dense, batches[0][0][:1]), out)


def _limit(batches: list[tuple[Tensor, Tensor]], n: int) -> list[tuple[Tensor, Tensor]]:
    out, left = [], n
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(y)
    return out


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, loader: DataLoader, num_batches: int, device: torch.device) -> None:
    """Running BatchNorm statistics from ``num_batches`` training batches (random-weight models)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= num_batches:
            break
        model(x.to(device))
    model.eval()


@torch.no_grad()
def dense_macs(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Matmul MACs per image of every ``nn.Linear``/``nn.Conv2d`` (attention's own matmuls excluded)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(m: nn.Module, args, y: Tensor) -> None:
            per_output = m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()
            macs[name] = macs.get(name, 0) + y.numel() // x.shape[0] * per_output
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return macs


# --------------------------------------------------------------------------- replacing layers

@contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[nn.Module]:
    """``model`` with submodule ``name`` replaced by ``module`` for the block, then restored."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield model
    finally:
        setattr(parent, child, original)


def layer_spec(dense: nn.Module, spec: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any] | None:
    """``spec`` (a :meth:`LUTConfig.spec_for`) updated by ``extra`` (V and/or K) and resolved for
    ``dense`` to ``num_codebooks``/``subvec_len``/``num_prototypes``; ``None`` when V does not divide D."""
    spec = dict(spec)
    if "subvec_len" in extra:
        spec["num_codebooks"] = None
    spec.update(extra)
    kind = "linear" if isinstance(dense, nn.Linear) else "conv2d"
    try:
        lut = LAYER_TYPES[kind][1].from_dense(copy.deepcopy(dense).to("meta"), **spec)
    except ValueError:
        return None
    return {"num_codebooks": lut.num_codebooks, "subvec_len": lut.subvec_len, "num_prototypes": lut.num_prototypes}


@torch.no_grad()
def build_replacement(method: str, dense: nn.Module, rows: Tensor, spec: dict[str, Any], niter: int = 25,
                      seed: int = 0, backend: str = "auto") -> nn.Module:
    """``dense`` as a ``method`` layer fitted on its calibration ``rows`` with resolved ``spec``."""
    if method in ("kmeans", "kmeans-int8"):
        kind = "linear" if isinstance(dense, nn.Linear) else "conv2d"
        lut = LAYER_TYPES[kind][1].from_dense(dense, num_codebooks=spec["num_codebooks"],
                                              num_prototypes=spec["num_prototypes"]).eval()
        init_prototypes(lut, {"": rows}, backend, niter, seed)  # the layer is its own root module ""
        if method == "kmeans-int8":
            lut.quantize_tables("output")
        return lut
    if method == "maddness":
        k = spec["num_prototypes"]
        if k & (k - 1):
            raise ValueError(f"MADDness needs K = 2**levels, got K={k}")
        kwargs = dict(num_codebooks=spec["num_codebooks"], subvec_len=None, levels=int(math.log2(k)))
        if isinstance(dense, nn.Linear):
            return MaddnessLinear.from_linear(dense, rows, **kwargs)
        return MaddnessConv2d.from_conv(dense, rows, **kwargs)
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


@torch.no_grad()
def output_error(module: nn.Module, dense: nn.Module, rows: Tensor) -> float:
    """``||f(X) - X W^T|| / ||X W^T||`` on input rows ``X`` (bias excluded)."""
    weight = dense.weight.reshape(dense.weight.shape[0], -1).float()
    exact = rows @ weight.T
    if isinstance(module, LUTBase):
        module.eval()
        approx = module._matmul_rows(rows)
    else:
        approx = (module.lut if isinstance(module, MaddnessConv2d) else module)(rows)
    if dense.bias is not None:
        approx = approx - dense.bias
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- layers

@dataclass
class LayerResult:
    name: str
    kind: str
    shape: str  # D x M
    setting: str  # C/K/V
    variant: int  # index in the swept settings; 0 = the config's
    num_codebooks: int
    num_prototypes: int
    subvec_len: int
    method: str
    macs: int  # dense matmul MACs per image
    macs_saved: int
    error: float
    top1: float
    drop: float  # dense top-1 minus this one
    logit_error: float


def macs_saved(method: str, macs: int, out_features: int, k: int) -> int:
    """Dense MACs minus the encoder's: k-means keeps ``D*K`` distance MACs per row, MADDness none."""
    return macs if method == "maddness" else macs - macs * k // out_features


def sweep_layers(setup: Setup, settings: Sequence[dict[str, Any]], methods: Sequence[str] = METHODS,
                 max_rows: int = 4096, log: Callable[[str], None] = print) -> tuple[float, list[LayerResult]]:
    """Replace every selected layer alone by each method and setting; returns (dense top-1, rows)."""
    cfg = setup.pipe.cfg
    dense_top1 = setup.accuracy(setup.dense)
    calib = setup.pipe.calibration_rows(setup.lut_model())
    held = setup.eval_rows(max_rows)
    modules = dict(setup.dense.named_modules())
    results = []
    for name in setup.names:
        dense = modules[name]
        base = setup.lut_config.spec_for(name)
        seen = []
        for variant, extra in enumerate(settings):
            spec = layer_spec(dense, base, extra)
            if spec is None or spec in seen:  # V does not divide D, or the config's setting again
                continue
            seen.append(spec)
            d = dense.weight[0].numel()
            m = dense.weight.shape[0]
            setting = f"C={spec['num_codebooks']} K={spec['num_prototypes']} V={spec['subvec_len']}"
            for method in methods:
                module = build_replacement(method, dense, calib[name], spec, cfg.init.niter, cfg.seed, cfg.init.backend)
                with swapped(setup.dense, name, module):
                    acc, logit_error = setup.evaluate(setup.dense)
                r = LayerResult(name, type(dense).__name__, f"{d}x{m}", setting, variant, spec["num_codebooks"],
                                spec["num_prototypes"], spec["subvec_len"], method, setup.macs[name],
                                macs_saved(method, setup.macs[name], m, spec["num_prototypes"]),
                                output_error(module, dense, held[name]), acc, dense_top1 - acc, logit_error)
                results.append(r)
                log(f"[layers] {name} {setting} {method}: {setup.metric} {acc:.2f}% (drop {r.drop:+.2f}), "
                    f"error {r.error:.4f}, logit error {logit_error:.4f}")
    return dense_top1, results


def layers_markdown(dense_top1: float, results: Sequence[LayerResult], metric: str, total_macs: int) -> str:
    lines = [
        f"Dense model: {metric} {dense_top1:.2f}%; Linear/Conv2d MACs per image {total_macs:,}. "
        "One layer replaced at a time, no retraining; sorted by drop. Output error: the layer's, on held-out "
        "rows; logit error: the model's, ||z - z_dense|| / ||z_dense||.", "",
        f"| layer | type | D x M | setting | method | MACs/img | MACs saved | output error | logit error | "
        f"{metric} (%) | drop |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (-r.drop, -r.logit_error)):
        lines.append(f"| {r.name} | {r.kind} | {r.shape} | {r.setting} | {r.method} | {r.macs:,} | "
                     f"{r.macs_saved:,} | {r.error:.4f} | {r.logit_error:.4f} | {r.top1:.2f} | {r.drop:+.2f} |")
    return "\n".join(lines)


def plot_layers(results: Sequence[LayerResult], path: Path, title: str) -> None:
    """Grouped bars per layer and method (the config's setting): top-1 drop, and the model's logit
    error below it; layers sorted by the first method's drop (ties by its logit error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r.name, r.method): r for r in results if r.variant == 0}
    methods = [m for m in METHODS if any(k[1] == m for k in rows)]
    names = sorted(dict.fromkeys(n for n, _ in rows),
                   key=lambda n: (-rows[n, methods[0]].drop, -rows[n, methods[0]].logit_error))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.22 * len(names) + 2), 5.6), sharex=True)
    width = 0.8 / len(methods)
    for ax, key, label in ((axes[0], "drop", "drop (points)"), (axes[1], "logit_error", "logit error")):
        for i, method in enumerate(methods):
            ax.bar([j + i * width for j in range(len(names))],
                   [getattr(rows[n, method], key) if (n, method) in rows else 0.0 for n in names], width,
                   label=METHOD_LABELS[method])
        ax.set_ylabel(label)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=90, fontsize=6)
    axes[0].set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@dataclass
class Suggestion:
    lut: dict[str, Any]  # the config's lut: block with exclude/overrides added
    replaced: list[str]
    predicted_drop: float  # sum of the chosen single-layer drops
    macs_saved: int  # per image


def suggest(results: Sequence[LayerResult], budget: float, lut: dict[str, Any], names: Sequence[str],
            method: str = "kmeans", resolution: float = 0.01) -> Suggestion:
    """A ``lut:`` block meeting ``budget`` (summed single-layer drops, points) at the largest MAC saving.

    Multiple-choice knapsack over layers: each stays dense or takes one swept setting of
    ``method`` (the pipeline retrains k-means LUTs); a negative drop counts as zero. Summing
    single-layer drops assumes they add up, which the progressive sweep can check.
    """
    cap = int(round(budget / resolution))
    options: dict[str, list[LayerResult]] = {}
    for r in results:
        if r.method == method and r.macs_saved > 0:
            options.setdefault(r.name, []).append(r)
    # best[c] = (saved, choices) with summed cost exactly <= c
    best: list[tuple[int, dict[str, LayerResult]]] = [(0, {})] * (cap + 1)
    for name, opts in options.items():
        new = list(best)
        for r in opts:
            cost = int(math.ceil(max(r.drop, 0.0) / resolution - 1e-9))
            for c in range(cost, cap + 1):
                saved, chosen = best[c - cost]
                if saved + r.macs_saved > new[c][0]:
                    new[c] = (saved + r.macs_saved, {**chosen, name: r})
        best = new
    saved, chosen = max(best, key=lambda t: t[0])
    block = copy.deepcopy(lut)
    block["exclude"] = list(block.get("exclude", [])) + [n for n in names if n not in chosen]
    overrides = dict(block.get("overrides", {}))  # later entries win: exact names go last
    overrides.update({n: {"subvec_len": r.subvec_len, "num_prototypes": r.num_prototypes}
                      for n, r in chosen.items() if r.variant != 0})
    block["overrides"] = overrides
    replaced = [n for n in names if n in chosen]
    return Suggestion(block, replaced, sum(max(chosen[n].drop, 0.0) for n in replaced), saved)


def layers_main(args: argparse.Namespace) -> int:
    import yaml

    setup = load_setup(args)
    grid = [{"subvec_len": v, "num_prototypes": k} for v in (args.subvec_len or [None])
            for k in (args.prototypes or [None])]
    settings = [{}] + [{k: v for k, v in g.items() if v is not None} for g in grid if any(g.values())]
    settings = [s for i, s in enumerate(settings) if s not in settings[:i]]
    dense_top1, results = sweep_layers(setup, settings, args.methods, args.max_rows, setup.pipe.log)
    total = sum(setup.macs.values())
    md = layers_markdown(dense_top1, results, setup.metric, total)
    (setup.out / "layers.json").write_text(json.dumps(
        {"dense_top1": dense_top1, "metric": setup.metric, "total_macs": total, "model": _model_label(setup),
         "layers": [asdict(r) for r in results]}, indent=1) + "\n")
    plot_layers(results, setup.out / "layers.png", f"{_model_label(setup)}: {setup.metric} drop, one layer replaced")
    if args.suggest is not None:
        s = suggest(results, args.suggest, setup.pipe.cfg.lut, setup.names)
        header = (f"# lutnn sweep layers --suggest {args.suggest}: {len(s.replaced)} layers, predicted drop "
                  f"{s.predicted_drop:.2f} points (sum of single-layer drops), MACs saved {s.macs_saved:,} "
                  f"of {total:,} per image\n")
        (setup.out / "suggest.yaml").write_text(header + yaml.safe_dump({"lut": s.lut}, sort_keys=False))
        md += (f"\n\n`--suggest {args.suggest}` -> suggest.yaml: {len(s.replaced)} of {len(setup.names)} layers "
               f"replaced, predicted drop {s.predicted_drop:.2f} points, {s.macs_saved / max(total, 1):.1%} "
               "of MACs saved.")
    emit(md, str(setup.out / "layers.md"))
    return 0


def _model_label(setup: Setup) -> str:
    m = setup.pipe.cfg.model
    return f"{m.source}:{m.name}" + (" (random weights)" if "agreement" in setup.metric else "")


# --------------------------------------------------------------------------- progressive

def progressive_order(setup: Setup, order: str) -> list[str]:
    if order == "front":
        return list(setup.names)
    path = setup.out / "layers.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --order sensitivity needs the layers sweep first (lutnn sweep layers)")
    drops = {r["name"]: r["drop"] for r in json.loads(path.read_text())["layers"]
             if r["method"] == "kmeans" and r["variant"] == 0}  # at the config's own setting
    missing = [n for n in setup.names if n not in drops]
    if missing:
        raise ValueError(f"{path}: no k-means result for layers {missing}; re-run lutnn sweep layers")
    return sorted(setup.names, key=lambda n: (drops[n], setup.names.index(n)))  # least sensitive first


def step_model(setup: Setup, replaced: Sequence[str]) -> nn.Module:
    cfg = dataclasses.replace(setup.lut_config, include=list(replaced), exclude=[])
    return convert(setup.dense, cfg)[0].to(setup.device)


def sweep_progressive(setup: Setup, order: Sequence[str], group: int, epochs: int) -> list[dict[str, Any]]:
    """Replace ``group`` layers per step (k-means on the current model's inputs), retrain ``epochs``."""
    from ..pipeline.data import set_epoch
    from ..pipeline.train import FitPaths, fit, load_checkpoint

    pipe, cfg = setup.pipe, setup.pipe.cfg
    total = sum(setup.macs.values())
    steps, model = [], None
    for s, lo in enumerate(range(0, len(order), group), start=1):
        replaced, new = order[: lo + group], order[lo: lo + group]
        step_dir = setup.out / "progressive" / f"step_{s:02d}"
        done = step_dir / "result.json"
        if done.is_file():
            steps.append(json.loads(done.read_text()))
            model = None
            continue
        current = step_model(setup, replaced)
        step_dir.mkdir(parents=True, exist_ok=True)
        last = step_dir / "last.pt"
        if model is None and s > 1:  # resumed: the previous step's retrained weights
            model = step_model(setup, order[:lo])
            model.load_state_dict(load_checkpoint(setup.out / "progressive" / f"step_{s - 1:02d}" / "last.pt")["model"])
        if model is not None:  # earlier groups keep their retrained weights; new layers get k-means below
            unexpected = current.load_state_dict(model.state_dict(), strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"step {s}: previous step's weights do not fit: {unexpected[:4]}")
        if not last.is_file():  # as Pipeline.calibration_rows, for the new layers only
            batches = pipe.loader(True)
            set_epoch(batches, 0, cfg.seed)
            rows = capture_rows(current, batches, cfg.init.max_rows, min(cfg.init.num_batches, len(batches)),
                                cfg.seed, setup.device, names=new)
            layers = lut_layers(current)
            for name in new:
                init_prototypes(layers[name], {"": rows[name]}, cfg.init.backend, cfg.init.niter, cfg.seed)
            init_top1 = setup.accuracy(current)
            (step_dir / "init.json").write_text(json.dumps({"top1": init_top1}) + "\n")
        else:
            init_top1 = json.loads((step_dir / "init.json").read_text())["top1"]
        current.requires_grad_(True)
        fit(current, pipe.loader(True), pipe.loader(False), dataclasses.replace(cfg.train, epochs=epochs),
            FitPaths(last, history=step_dir / "history.json"), pipe.env, stage=f"progressive step {s}",
            seed=cfg.seed + s, teacher=setup.dense if cfg.distill.enabled else None, distill=cfg.distill,
            log_every=cfg.log.every_steps, resume=True)
        row = {"step": s, "layers": len(replaced), "replaced": list(new),
               "mac_fraction": sum(setup.macs[n] for n in replaced) / total,
               "top1_init": init_top1, "top1": setup.accuracy(current)}
        done.write_text(json.dumps(row, indent=1) + "\n")
        pipe.log(f"[progressive] step {s}: {len(replaced)} layers ({row['mac_fraction']:.1%} of MACs): "
                 f"{init_top1:.2f}% after init -> {row['top1']:.2f}% after {epochs} epoch(s)")
        steps.append(row)
        model = current
    return steps


def plot_progressive(steps: Sequence[dict], dense_top1: float, all_at_once: dict | None, path: Path,
                     title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in ((axes[0], "layers", "layers replaced"), (axes[1], "mac_fraction", "fraction of MACs replaced")):
        xs = [0] + [s[key] for s in steps]
        ax.plot(xs, [dense_top1] + [s["top1"] for s in steps], marker="o", label="progressive, after retrain")
        ax.plot(xs[1:], [s["top1_init"] for s in steps], marker=".", ls="--", label="progressive, before retrain")
        if all_at_once:
            x_all = steps[-1][key]
            ax.scatter([x_all], [all_at_once["retrained"]], marker="*", s=160, color="C3", zorder=3,
                       label=f"all at once, retrained ({all_at_once['epochs']} epochs)")
            ax.scatter([x_all], [all_at_once["kmeans_init"]], marker="x", s=60, color="C3", zorder=3,
                       label="all at once, k-means init")
        ax.set(xlabel=label, title=title if ax is axes[0] else "")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def progressive_main(args: argparse.Namespace) -> int:
    setup = load_setup(args)
    order = progressive_order(setup, args.order)
    steps = sweep_progressive(setup, order, args.group, args.epochs)
    dense_top1 = setup.accuracy(setup.dense)
    all_at_once = None
    if not args.no_all_at_once:
        results = setup.pipe.run()  # the pipeline's recipe in its own run dir (resumes, skips finished stages)
        all_at_once = {"kmeans_init": results["kmeans_init"].top1, "retrained": results["retrained"].top1,
                       "epochs": setup.pipe.cfg.train.epochs}
    (setup.out / "progressive.json").write_text(json.dumps(
        {"order": args.order, "group": args.group, "epochs_per_step": args.epochs, "dense_top1": dense_top1,
         "all_at_once": all_at_once, "steps": steps}, indent=1) + "\n")
    plot_progressive(steps, dense_top1, all_at_once, setup.out / "progressive.png",
                     f"{_model_label(setup)}: progressive ({args.order}, {args.epochs} epoch/step)")
    lines = [f"Order: {args.order}; {args.group} layer(s) per step, {args.epochs} retraining epoch(s) per step. "
             f"Dense top-1 {dense_top1:.2f}%.", "",
             "| step | layers | MAC fraction | new layers | top-1 after init | top-1 after retrain |",
             "|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['layers']} | {s['mac_fraction']:.3f} | {', '.join(s['replaced'])} | "
              f"{s['top1_init']:.2f} | {s['top1']:.2f} |" for s in steps]
    if all_at_once:
        lines.append(f"\nAll at once (pipeline: k-means init, then {all_at_once['epochs']} epochs): "
                     f"{all_at_once['kmeans_init']:.2f}% -> {all_at_once['retrained']:.2f}%.")
    emit("\n".join(lines), str(setup.out / "progressive.md"))
    return 0


# --------------------------------------------------------------------------- calibration

def calibration_images(setup: Setup, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    train = setup.pipe.splits.train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(Subset(train, pick), batch_size=setup.pipe.cfg.data.batch_size)
    return [(x.to(setup.device), y) for x, y in loader]


def sweep_calibration(setup: Setup, counts: Sequence[int], methods: Sequence[str], max_rows: int,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """No-retrain model (every selected layer replaced) vs number of calibration images."""
    cfg = setup.pipe.cfg
    held = setup.eval_rows(max_rows)
    modules = dict(setup.dense.named_modules())
    out = []
    for n in counts:
        lut = setup.lut_model()
        rows = capture_rows(lut, calibration_images(setup, n, cfg.seed), max_rows, None, cfg.seed, setup.device)
        layers = lut_layers(lut)
        for method in methods:
            model = copy.deepcopy(setup.dense)
            errors = []
            for name in setup.names:
                layer = layers[name]
                spec = {"num_codebooks": layer.num_codebooks, "num_prototypes": layer.num_prototypes}
                module = build_replacement(method, modules[name], rows[name], spec, cfg.init.niter, cfg.seed,
                                           cfg.init.backend)
                errors.append(output_error(module, modules[name], held[name]))
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
            row = {"images": n, "rows": int(rows[setup.names[0]].shape[0]), "method": method,
                   "top1": setup.accuracy(model), "error": sum(errors) / len(errors)}
            log(f"[calibration] {n} images, {method}: {setup.metric} {row['top1']:.2f}%, mean error {row['error']:.4f}")
            out.append(row)
    return out


def plot_calibration(rows: Sequence[dict], dense_top1: float, path: Path, title: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        ax_acc.plot([r["images"] for r in rs], [r["top1"] for r in rs], marker="o", label=METHOD_LABELS[method])
        ax_err.plot([r["images"] for r in rs], [r["error"] for r in rs], marker="o", label=METHOD_LABELS[method])
    ax_acc.axhline(dense_top1, color="k", ls=":", label="dense")
    ax_acc.set(xscale="log", xlabel="calibration images", ylabel=f"{metric} (%)", title=title)
    ax_err.set(xscale="log", xlabel="calibration images", ylabel="mean held-out output error",
               title="relative error, mean over layers")
    for ax in (ax_acc, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def calibration_main(args: argparse.Namespace) -> int:
    setup = load_setup(args)
    available = len(setup.pipe.splits.train)
    counts = sorted({min(n, available) for n in args.images})
    rows = sweep_calibration(setup, counts, args.methods, args.max_rows, setup.pipe.log)
    dense_top1 = setup.accuracy(setup.dense)
    (setup.out / "calibration.json").write_text(json.dumps(
        {"dense_top1": dense_top1, "metric": setup.metric, "train_images": available, "rows": rows}, indent=1) + "\n")
    plot_calibration(rows, dense_top1, setup.out / "calibration.png",
                     f"{_model_label(setup)}: no retraining", setup.metric)
    lines = [f"Every selected layer replaced, no retraining; dense {setup.metric} {dense_top1:.2f}%. "
             f"Rows per layer capped at {args.max_rows}.", "",
             f"| images | rows (first layer) | method | {setup.metric} (%) | mean output error |",
             "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['images']} | {r['rows']} | {r['method']} | {r['top1']:.2f} | {r['error']:.4f} |" for r in rows]
    emit("\n".join(lines), str(setup.out / "calibration.md"))
    return 0


# --------------------------------------------------------------------------- fit benchmark

def fit_bench_main(args: argparse.Namespace) -> int:
    """Time ``MaddnessLinear.fit`` with ``--threads`` torch threads while ``--load`` busy processes run."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(args.rows, args.dim, generator=gen) * torch.rand(args.dim, generator=gen)
    weight = torch.randn(args.dim, args.dim, generator=gen)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    variants = {"pinned to 1 thread (default)": 1, f"caller's {args.threads} threads": None}
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    try:
        MaddnessLinear.fit(rows[:256], weight, num_codebooks=args.codebooks)  # warm-up
        for _ in range(args.repeats):
            for label, threads in variants.items():  # interleaved: both see the same contention
                start, start_cpu = time.perf_counter(), time.process_time()
                MaddnessLinear.fit(rows, weight, num_codebooks=args.codebooks, num_threads=threads)
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    lines = [f"`MaddnessLinear.fit` on [{args.rows}, {args.dim}] rows, C={args.codebooks}, K=16; "
             f"torch threads {args.threads}, {args.load} busy process(es), {args.repeats} runs each.", "",
             "| variant | median s | min s | max s | spread (max/min) | median CPU s (all threads) |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, ts in times.items():
        ts, cs = sorted(ts), sorted(cpu[label])
        lines.append(f"| {label} | {ts[len(ts) // 2]:.3f} | {ts[0]:.3f} | {ts[-1]:.3f} | {ts[-1] / ts[0]:.2f}x | "
                     f"{cs[len(cs) // 2]:.3f} |")
    lines.append(f"\nMachine load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
                 f"on {os.cpu_count()} cores (wall time beyond the CPU time is waiting for a core).")
    out = Path(args.out or "runs/sweeps")
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for i, (label, ts) in enumerate(times.items()):
        ax.scatter(ts, [i] * len(ts), alpha=0.7)
    ax.set_yticks(range(len(times)), list(times))
    ax.set(xlabel="seconds per fit", title=f"MaddnessLinear.fit C={args.codebooks}, {args.load} core(s) busy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fit_bench.png", dpi=90)
    plt.close(fig)
    emit("\n".join(lines), str(out / "fit_bench.md"))
    return 0


# --------------------------------------------------------------------------- CLI

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lut.num_prototypes=16")
    p.add_argument("--out", help="output folder (default: <output_dir>/sweeps)")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights (BatchNorm stats from 4 batches); metric: agreement with dense")
    p.add_argument("--all-layers", action="store_true",
                   help="every convertible layer, ignoring the config's include/exclude/overrides")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N eval images")
    p.add_argument("--max-rows", type=int, default=4096, help="held-out rows per layer for output errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Where LUT compression hurts: per-layer sensitivity, progressive "
                                                 "replacement, calibration convergence, MADDness fit benchmark.")
    sub = parser.add_subparsers(dest="analysis", required=True)
    p = sub.add_parser("layers", help="each layer replaced alone (k-means, MADDness, int8) -> layers.{md,json,png}")
    _common(p)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--subvec-len", type=int, nargs="+", help="grid of V (besides the config's)")
    p.add_argument("--prototypes", type=int, nargs="+", help="grid of K (besides the config's)")
    p.add_argument("--suggest", type=float, metavar="BUDGET",
                   help="write suggest.yaml: a lut: block within BUDGET points of summed drop, most MACs saved")
    p.set_defaults(func=layers_main)
    p = sub.add_parser("progressive", help="replace a group, retrain, repeat -> progressive.{md,json,png}")
    _common(p)
    p.add_argument("--order", choices=("sensitivity", "front"), default="sensitivity",
                   help="sensitivity: least sensitive first (needs the layers sweep); front: model order")
    p.add_argument("--group", type=int, default=2, help="layers replaced per step")
    p.add_argument("--epochs", type=int, default=1, help="retraining epochs after each step")
    p.add_argument("--no-all-at-once", action="store_true", help="do not run the pipeline's recipe for comparison")
    p.set_defaults(func=progressive_main)
    p = sub.add_parser("calibration", help="no-retrain accuracy vs calibration images -> calibration.{md,json,png}")
    _common(p)
    p.add_argument("--images", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024, 4096])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["kmeans", "maddness"])
    p.set_defaults(func=calibration_main, max_rows=16384)
    p = sub.add_parser("fit-bench", help="MaddnessLinear.fit time and spread under load -> fit_bench.{md,png}")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--codebooks", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the caller")
    p.add_argument("--load", type=int, default=1, help="busy-loop processes running meanwhile")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", help="output folder (default: runs/sweeps)")
    p.set_defaults(func=fit_bench_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..convert import LUTConfigError
    from ..pipeline.config import ConfigError
    from ..pipeline.data import DataError
    from ..pipeline.runner import RunError

    args = build_parser().parse_args(argv)
    if getattr(args, "group", 1) < 1 or getattr(args, "epochs", 1) < 1:
        print("error: --group and --epochs must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, LUTConfigError, RunError, FileNotFoundError, ValueError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
