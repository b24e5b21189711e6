"""Model-level benchmark: a converted LUT model against the dense engines a user would deploy.

    lutnn bench-model                                    # DeiT-Tiny + ResNet-18, batch 1 8, threads 1 + all
    lutnn bench-model --models deit_tiny_patch16_224 --batch 1 --threads 1 --tune-trials 8
    lutnn bench-model --quick --models deit_tiny_patch16_224 --out /tmp/bm   # small images, seconds

Per (model, batch, threads): median latency of every row below, its speed-up over the fastest
dense row and over PyTorch dense fp32, all measured in the same process and run. Weights and
prototypes are random (latency does not depend on them); LUT layers use int8 tables
(granularity ``output``) with each model's conversion from :data:`MODEL_CONFIGS`. A row that
cannot run (e.g. a layer type without TVM kernels) is reported with its reason. Writes
``bench_model.md`` and ``bench_model.png`` into ``--out``.

Full run (2 models x 2 batches x 2 thread counts, tune trials 0): about 10-15 minutes on a
quiet 2-core machine; ``--quick``: under a minute.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .. import LUTConfig, convert_, lut_layers, quantize_tables_
from .dense_baselines import dense_variant
from .report import CLOCKS, write_report

# model name -> how it is converted (the setups: DeiT V=8 on the blocks; ResNet default
# V (kh*kw = 9 for 3x3), V=4 for the 1x1 downsample convs, stem and classifier dense)
MODEL_CONFIGS: dict[str, LUTConfig] = {
    "deit_tiny_patch16_224": LUTConfig(subvec_len=8, include=["blocks.*"]),
    "deit_small_patch16_224": LUTConfig(subvec_len=8, include=["blocks.*"]),
    "resnet18": LUTConfig(exclude=["conv1", "fc"], overrides={"*.downsample.0": {"subvec_len": 4}}),
    "resnet50": LUTConfig(exclude=["conv1", "fc"], overrides={"*.conv1": {"subvec_len": 4},
                                                              "*.conv3": {"subvec_len": 4},
                                                              "*.downsample.0": {"subvec_len": 4}}),
}
# row key -> label; "dense" rows compete for "best dense"
DENSE_ROWS = {
    "torch-fp32": "PyTorch dense fp32",
    "torch-int8": "PyTorch dense int8 (dynamic)",
    "ort-fp32": "ONNX Runtime dense fp32",
    "tvm-dense": "TVM dense (compile_model)",
}
LUT_ROWS = {
    "torch-lut": "PyTorch LUT eager",
    "accelerate": "PyTorch LUT + accelerate_ (TVM kernels)",
    # diagnostics of accelerate_: LUT kernels alone (no max-pool kernel, no BN folding); TVM pool at 1 thread
    "accelerate-lut-only": "accelerate_, LUT layers only (no max-pool kernel, no BN folding)",
    "accelerate-tvm1": "accelerate_, TVM kernels on 1 thread",
    "tvm-lut": "TVM LUT whole model (compile_model)",
    "non-lut": "non-LUT part alone (LUT layers free)",
}
ROWS = {**DENSE_ROWS, **LUT_ROWS}
MS_ROWS = ("tvm-dense", "tvm-lut")  # rows whose non-LUT functions --ms-trials tunes
QUICK_IMG = 32
TOP_FUNCS = 12  # compiled functions listed per TVM row by --breakdown


@dataclass
class Case:
    model: str
    batch: int
    threads: int
    ms: dict[str, float] = field(default_factory=dict)
    lut_kinds: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # row -> lut_time_by_kind
    tvm_funcs: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # row -> CompiledModel.profile
    failed: dict[str, str] = field(default_factory=dict)  # row -> reason

    def best_dense(self) -> tuple[str, float] | None:
        dense = [(k, v) for k, v in self.ms.items() if k in DENSE_ROWS]
        return min(dense, key=lambda kv: kv[1]) if dense else None


def make_models(name: str, img_size: int) -> tuple[nn.Module, nn.Module]:
    """``(dense, lut)``: random weights, LUT copy converted per :data:`MODEL_CONFIGS` with int8 tables."""
    import timm

    if name not in MODEL_CONFIGS:
        raise ValueError(f"--models {name}: no LUT conversion known; known: {sorted(MODEL_CONFIGS)}")
    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if "deit" in name or "vit" in name else {}
    dense = timm.create_model(name, pretrained=False, **kwargs).eval()
    lut = copy.deepcopy(dense)
    convert_(lut, MODEL_CONFIGS[name])
    quantize_tables_(lut, "output")
    return dense, lut.eval()


def _onnx_runtime(model: nn.Module, x: Tensor, threads: int) -> Callable[[Tensor], object]:
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return lambda t: sess.run(None, {"x": t.numpy()})[0]


def _free_lut_layers(lut: nn.Module) -> nn.Module:
    """A copy whose LUT layers return uninitialised outputs of the right shape: the floor set
    by everything that is not a LUT layer."""
    from ..tvm.accelerate import output_shape

    free = copy.deepcopy(lut)
    for layer in lut_layers(free).values():
        layer.forward = lambda x, layer=layer: x.new_empty(output_shape(layer, tuple(x.shape)))
    return free


def build_row(row: str, dense: nn.Module, lut: nn.Module, x: Tensor, threads: int, tune_trials: int,
              tuning_dir: Path, ms_trials: int | None = None) -> Callable[[Tensor], object]:
    """The callable timed for ``row`` (its setup — export, compile, tuning — is not timed)."""
    from ..tvm.target import host_target

    if row == "torch-fp32":
        return dense
    if row == "torch-int8":
        fn = dense_variant(dense, "int8-dynamic")
        if fn is None:
            raise RuntimeError("torch.ao dynamic quantisation unavailable on this build")
        return fn
    if row == "ort-fp32":
        return _onnx_runtime(dense, x, threads)
    if row == "torch-lut":
        return lut
    if row == "non-lut":
        return _free_lut_layers(lut)
    target = host_target(threads)
    if row.startswith("accelerate"):
        from ..tvm.accelerate import AccelerateConfig, accelerate_

        model = copy.deepcopy(lut)
        tvm_threads = 1 if row == "accelerate-tvm1" else threads
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a layer left in PyTorch makes this row a failure, not a mix
            accelerate_(model, AccelerateConfig(target=host_target(tvm_threads), tuning_dir=tuning_dir,
                                                tune_trials=tune_trials, threads=tvm_threads,
                                                non_lut_ops=row != "accelerate-lut-only",
                                                fold_bn=row != "accelerate-lut-only"))
            model(x)  # builds (and tunes) the kernels of this shape
        return model
    from ..tvm.relax_model import compile_model, lut_kernel_specs
    from ..tvm.tuning import tune_kernels

    if row == "tvm-dense":
        return compile_model(dense, x, target, ms_trials=ms_trials, tuning_dir=tuning_dir)
    if row == "tvm-lut":
        db = tune_kernels(lut_kernel_specs(lut, x), target, tuning_dir, tune_trials)
        return compile_model(lut, x, target, db, ms_trials=ms_trials, tuning_dir=tuning_dir)
    raise ValueError(f"unknown row {row!r}; known: {list(ROWS)}")




def median_ms(fn: Callable[[Tensor], object], x: Tensor, min_ms: float, repeat: int, clock: str = "wall") -> float:
    """Median of ``repeat`` samples, each the mean of enough calls to last ``min_ms``.

    ``clock="thread"`` counts this thread's CPU time: with 1 thread every engine here runs on
    the calling thread, so the number ignores time spent waiting for a core on a busy machine.
    """
    now = CLOCKS[clock]
    with torch.no_grad():
        fn(x)
        start = now()
        fn(x)
        number = max(1, int(min_ms / 1e3 / max(now() - start, 1e-6)))
        samples = []
        for _ in range(repeat):
            start = now()
            for _ in range(number):
                fn(x)
            samples.append((now() - start) / number * 1e3)
    return float(np.median(samples))


def lut_time_by_kind(model: nn.Module, x: Tensor, clock: str = "wall", calls: int = 5) -> dict[str, tuple[int, float]]:
    """In-model time of the LUT layers per kind (last name component, e.g. ``fc1``): kind ->
    (layers, ms per forward), measured between forward pre- and post-hooks over ``calls`` forwards."""
    now, spent, count, hooks = CLOCKS[clock], {}, {}, []
    for name, layer in lut_layers(model).items():
        kind = name.rsplit(".", 1)[-1]
        count[kind] = count.get(kind, 0) + 1
        hooks.append(layer.register_forward_pre_hook(lambda m, a: setattr(m, "_bench_t0", now())))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, kind=kind: spent.__setitem__(kind, spent.get(kind, 0.0) + now() - m._bench_t0)))
    with torch.no_grad():
        model(x)
        spent.clear()
        for _ in range(calls):
            model(x)
    for h in hooks:
        h.remove()
    return {k: (count[k], spent.get(k, 0.0) / calls * 1e3) for k in count}


def run_case(name: str, batch: int, threads: int, rows: list[str], img_size: int, tune_trials: int,
             tuning_dir: Path, min_ms: float, repeat: int, clock: str = "wall", breakdown: bool = False,
             ms_trials: int | None = None) -> Case:
    from ..tvm.target import set_num_threads

    torch.set_num_threads(threads)
    set_num_threads(threads)
    case = Case(name, batch, threads)
    dense, lut = make_models(name, img_size)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, img_size, img_size)
    for row in rows:
        set_num_threads(threads)  # a row may resize TVM's pool (accelerate-tvm1): reset it for the next
        try:
            with torch.no_grad():
                fn = build_row(row, dense, lut, x, threads, tune_trials, tuning_dir, ms_trials)
            case.ms[row] = median_ms(fn, x, min_ms, repeat, clock)
            if breakdown and row in ("torch-lut", "accelerate", "accelerate-lut-only"):
                case.lut_kinds[row] = lut_time_by_kind(fn, x, clock)
            if breakdown and row in ("tvm-lut", "tvm-dense"):
                case.tvm_funcs[row] = fn.profile(x, clock=CLOCKS[clock])
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            case.failed[row] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]
        print(f"  {name} b{batch} t{threads} {row}: "
              f"{case.ms[row]:.2f} ms" if row in case.ms else f"  {name} b{batch} t{threads} {row}: "
              f"failed ({case.failed[row]})", flush=True)
    return case


def row_labels(ms_trials: int | None = None) -> dict[str, str]:
    """:data:`ROWS`, the compiled rows marked with their MetaSchedule budget when one is used."""
    if ms_trials is None:
        return dict(ROWS)
    how = f"MetaSchedule {ms_trials} trials" if ms_trials else "MetaSchedule database records"
    return {row: f"{label}, {how}" if row in MS_ROWS else label for row, label in ROWS.items()}


def _breakdown(title: str, heads: tuple[str, str], items) -> list[str]:
    """A "where the time goes" table: ``(name, (count, ms per forward))`` per line."""
    return [title, "", f"| {heads[0]} | {heads[1]} | ms per forward |", "|---|---:|---:|",
            *(f"| {k} | {n} | {ms:.2f} |" for k, (n, ms) in items), ""]


def to_markdown(cases: list[Case], header: str, ms_trials: int | None = None) -> str:
    labels = row_labels(ms_trials)
    lines = [header, ""]
    for c in cases:
        best = c.best_dense()
        fp32 = c.ms.get("torch-fp32")
        lines += [f"### {c.model}, batch {c.batch}, {c.threads} thread{'s' if c.threads > 1 else ''}", "",
                  "| row | median ms | speed-up vs best dense | vs PyTorch fp32 |", "|---|---:|---:|---:|"]
        for row, label in labels.items():
            if row in c.ms:
                ms = c.ms[row]
                vs_best = f"{best[1] / ms:.2f}x" if best else "-"
                vs_fp32 = f"{fp32 / ms:.2f}x" if fp32 else "-"
                mark = " (best dense)" if best and row == best[0] else ""
                lines.append(f"| {label}{mark} | {ms:.2f} | {vs_best} | {vs_fp32} |")
            elif row in c.failed:
                lines.append(f"| {label} | failed: {c.failed[row].replace('|', '/')} | - | - |")
        lines.append("")
        for row, kinds in c.lut_kinds.items():
            total = sum(ms for _, ms in kinds.values())
            lines += _breakdown(f"Where the time goes, {ROWS[row]}: LUT layers {total:.2f} ms of {c.ms[row]:.2f} ms "
                                f"per forward (in the model, hooks around each layer)",
                                ("LUT layer kind", "layers"), kinds.items())
        for row, funcs in c.tvm_funcs.items():
            total = sum(ms for _, ms in funcs.values())
            lines += _breakdown(f"Where the time goes, {labels[row]}: {total:.2f} ms in compiled functions per "
                                f"forward (VM instrument; the {TOP_FUNCS} slowest)",
                                ("function", "calls"), list(funcs.items())[:TOP_FUNCS])
    lines.append("Speed-ups > 1 mean faster than the reference. \"non-LUT part alone\" is a diagnostic, "
                 "not a deployable row: the same LUT model with every LUT layer returning an empty tensor.")
    return "\n".join(lines)


def plot(cases: list[Case], path: Path, ms_trials: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in ROWS if r != "non-lut" and any(r in c.ms for c in cases)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2) + 3, 4))
    width = 0.8 / max(len(shown), 1)
    xs = np.arange(len(cases))
    for i, row in enumerate(shown):
        vals = [(c.best_dense()[1] / c.ms[row]) if row in c.ms and c.best_dense() else 0.0 for c in cases]
        ax.bar(xs + (i - (len(shown) - 1) / 2) * width, vals, width, label=row_labels(ms_trials)[row])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(xs, [f"{c.model}\nb{c.batch} t{c.threads}" for c in cases], fontsize=7)
    ax.set_ylabel("speed-up over the best dense row")
    ax.set_title("Whole model latency on CPU (higher is faster)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "resnet18"],
                    help=f"timm model names with a known conversion: {sorted(MODEL_CONFIGS)}")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all)")
    ap.add_argument("--rows", nargs="+", default=[r for r in ROWS if not r.startswith("accelerate-")],
                    choices=list(ROWS), help="rows to measure (default: all but the accelerate- diagnostics)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--tune-trials", type=int, default=0, help="LUT kernel tuning trials per shape (0: hand schedule)")
    ap.add_argument("--ms-trials", type=int, default=None,
                    help="MetaSchedule for the non-LUT functions of the TVM rows: trials per function without a "
                         "record in --tuning-dir (0: apply the records only; default: hand schedules only)")
    ap.add_argument("--tuning-dir", default=None, help="tuning database dir (default OUT/tvm_tuning)")
    ap.add_argument("--min-ms", type=float, default=200.0, help="each sample runs at least this long")
    ap.add_argument("--repeat", type=int, default=7, help="samples per row (the median is reported)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or this thread's CPU time (1 thread only: robust on a busy machine)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the LUT layers inside the model per kind (qkv, fc1, ...) for the PyTorch LUT "
                         "rows, and each compiled function for the TVM rows")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_IMG}px images, one short sample set (smoke test)")
    ap.add_argument("--out", default="bench_model_out", help="directory for bench_model.md and bench_model.png")
    args = ap.parse_args(argv)
    for name in args.models:
        if name not in MODEL_CONFIGS:
            ap.error(f"--models {name}: no LUT conversion known; known: {sorted(MODEL_CONFIGS)}")
    if args.clock == "thread" and any(t != 1 for t in (args.threads or [2])):
        ap.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
    if args.quick:
        args.img_size, args.min_ms, args.repeat = QUICK_IMG, 5.0, 3
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tuning_dir = Path(args.tuning_dir) if args.tuning_dir else out / "tvm_tuning"
    start = time.perf_counter()
    cases = [run_case(m, b, t, args.rows, args.img_size, args.tune_trials, tuning_dir, args.min_ms, args.repeat,
                      args.clock, args.breakdown, args.ms_trials)
             for m in args.models for t in threads for b in args.batch]
    from ..tvm.target import host_target

    header = (f"## Whole-model latency ({args.img_size}px, int8 LUT tables, random weights; "
              f"{os.cpu_count()} CPUs, target {host_target(1).attrs['mcpu']}, tune trials {args.tune_trials}, "
              f"{f'MetaSchedule trials {args.ms_trials}, ' if args.ms_trials is not None else ''}"
              f"{args.clock} clock, median of {args.repeat} samples >= {args.min_ms:g} ms; run took {time.perf_counter() - start:.0f} s)")
    write_report(out, "bench_model", to_markdown(cases, header, args.ms_trials),
                 lambda path: plot(cases, path, args.ms_trials))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
