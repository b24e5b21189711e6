"""Training-step benchmark: LUT layers (reference and fused STE) against the dense layers they replace.

    lutnn bench-train                      # every case, 1 thread, --out bench_train/
    lutnn bench-train --only linear --reps 5 --threads 2

A step is forward + backward of ``(y * r).sum()`` with a fixed random ``r`` (whole models:
cross-entropy), in train mode, gradients to the input and every parameter. Per case, one
run times the dense module, the LUT module with ``ste_impl="reference"`` and with
``"fused"`` (median of ``--reps`` after one warm-up step each), and measures each step's
peak memory: on CUDA ``max_memory_allocated``, on CPU the highest running sum of the
allocations the profiler records during the step, both above what was live before it.
Cases: LUTLinear at N=8320, D=64, M=256 (the default config's DeiT rows) and DeiT-Tiny's
N=197*8, D=192, M=576/768 at V=4 and 8; LUTConv2d 3x3 64->128 at 28x28, batch 64; a whole
DeiT-Tiny 224 train step at batch 8 (``blocks.*`` converted, V=4); and (group ``epoch``)
one dense-teacher epoch and one LUT-retraining epoch per implementation of ``--config``. Writes
``bench_train.md`` and ``bench_train.png`` into ``--out``; a few minutes at 1 thread on a
quiet machine (the ``compiled`` column adds one torch.compile per layer shape).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import LUTConfig, convert, lut_layers
from ..layers import STE_IMPLS, LUTBase, LUTConv2d, LUTLinear
from ..progress import progress
from .report import CLOCKS

GROUPS = ("linear", "conv", "deit", "epoch")
K = 16


@dataclass
class Case:
    group: str
    name: str
    make: Callable[[], tuple[nn.Module, nn.Module, Tensor]]  # (dense, lut, input)
    loss: str = "random"  # "random": (y * r).sum(); "ce": cross-entropy on random labels


@dataclass
class Result:
    case: Case
    ms: dict[str, float] = field(default_factory=dict)  # dense / reference / fused -> median step
    mib: dict[str, float] = field(default_factory=dict)  # same keys -> peak memory above start
    ops: list[tuple[str, float, int]] = field(default_factory=list)  # --ops: (op, self CPU ms, calls)

    def ratio(self, impl: str, table: dict[str, float]) -> float:
        return table[impl] / table["dense"]


def _linear(n: int, d: int, m: int, v: int) -> Callable:
    def make():
        dense = nn.Linear(d, m)
        return dense, LUTLinear.from_dense(dense, subvec_len=v, num_prototypes=K), torch.randn(n, d)
    return make


def _conv() -> tuple[nn.Module, nn.Module, Tensor]:
    dense = nn.Conv2d(64, 128, 3, padding=1)
    return dense, LUTConv2d.from_dense(dense, num_prototypes=K), torch.randn(64, 64, 28, 28)


def _deit() -> tuple[nn.Module, nn.Module, Tensor]:
    import timm

    dense = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=1000)
    lut, _ = convert(dense, LUTConfig(subvec_len=4, num_prototypes=K, include=["blocks.*"]))
    return dense, lut, torch.randn(8, 3, 224, 224)


def cases() -> list[Case]:
    out = [Case("linear", f"LUTLinear N={n} D={d} M={m} V={v}", _linear(n, d, m, v))
           for n, d, m in ((8320, 64, 256), (197 * 8, 192, 576), (197 * 8, 192, 768)) for v in (4, 8)]
    out.append(Case("conv", "LUTConv2d 3x3 64->128 28x28 B=64 (V=9)", _conv))
    out.append(Case("deit", "DeiT-Tiny 224 B=8 train step (blocks V=4)", _deit, loss="ce"))
    return out


def _step_fn(module: nn.Module, x: Tensor, loss: str) -> Callable[[], None]:
    module.train()
    x = x.requires_grad_(loss == "random")  # layers get an input gradient; whole models do not
    with torch.no_grad():
        y = module(x)
    target = torch.randint(0, y.shape[-1], (y.shape[0],), device=x.device) if loss == "ce" else torch.randn(y.shape)

    def step() -> None:
        y = module(x)
        (F.cross_entropy(y, target) if loss == "ce" else (y * target).sum()).backward()
        # freed here, inside the step, so the profiler sees both ends of every block it counts
        module.zero_grad(set_to_none=True)
        x.grad = None
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()




def time_step(step: Callable[[], None], reps: int, device: torch.device, clock: str = "wall") -> float:
    """Median milliseconds of ``reps`` steps after one warm-up step.

    ``clock="thread"`` counts the CPU time of this thread only: with ``--threads 1`` on CPU
    that is the whole step, and it is far less disturbed by other processes than wall time.
    """
    now = CLOCKS[clock]
    step()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = now()
        step()
        _sync(device)
        times.append(now() - t0)
    return 1e3 * statistics.median(times)


def peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory one step allocates above what was live before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def top_ops(step: Callable[[], None], count: int) -> list[tuple[str, float, int]]:
    """The ``count`` operators with the most self CPU time in one step (torch.profiler): where
    a LUT step spends the time that its dense step does not."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:count]
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows]


def run_case(case: Case, reps: int, device: torch.device, impls: list[str], clock: str = "wall",
             ops: int = 0) -> Result:
    torch.manual_seed(0)
    dense, lut, x = case.make()
    dense, lut, x = dense.to(device), lut.to(device), x.to(device)
    res = Result(case)
    variants = {"dense": dense, **{impl: lut for impl in impls}}
    for name, module in variants.items():
        for layer in lut_layers(module).values():
            layer.set_ste_impl(name)
        step = _step_fn(module, x.clone(), case.loss)
        res.ms[name] = time_step(step, reps, device, clock)
        res.mib[name] = peak_mib(step, device)
        if ops and name == impls[-1]:
            res.ops = top_ops(step, ops)
    return res


def epoch_seconds(config: Path, impls: list[str]) -> dict[str, float]:
    """One teacher epoch and one LUT-retraining epoch per ``ste_impl`` of ``config`` (train + eval seconds)."""
    from ..pipeline import Pipeline, load_config

    def run(out: Path, stages: list[str], stage: str) -> float:
        cfg = load_config(config, [f"output_dir={out}", "teacher.epochs=1", "train.epochs=1",
                                   "log.tensorboard=false", "log.plot=false"])
        pipe = Pipeline(cfg)
        pipe.run(stages, resume=False)
        return json.loads(pipe.paths.history(stage).read_text())[-1]["seconds"]

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        seconds = {"dense": run(base, ["teacher", "prototypes"], "teacher")}
        for impl in impls:
            out = Path(tmp) / impl
            out.mkdir()
            for name in ("teacher.pt", "prototypes.safetensors"):
                shutil.copy(base / name, out / name)
            LUTBase.ste_impl = impl
            try:
                seconds[impl] = run(out, ["train"], "lut")
            finally:
                LUTBase.ste_impl = "fused"
    return seconds


def to_markdown(results: list[Result], header: str, impls: list[str]) -> str:
    """Two tables (time, memory): dense, each LUT implementation, and each one's ratio to dense."""
    out = [header, ""]
    for table, unit in (("ms", "step ms"), ("mib", "peak MiB")):
        cols = ["dense", *impls]
        out += [f"| case | {' | '.join(f'{c} {unit}' for c in cols)} | {' | '.join(f'{i} / dense' for i in impls)} |",
                "|---|" + "---:|" * (2 * len(impls) + 1)]
        for r in results:
            values = getattr(r, table)
            cells = [f"{values[c]:.1f}" for c in cols] + [f"{r.ratio(i, values):.2f}x" for i in impls]
            out.append(f"| {r.case.name} | {' | '.join(cells)} |")
        out.append("")
    for r in results:
        if r.ops:
            out += [f"Top operators of one `{impls[-1]}` step, {r.case.name} (self CPU time, profiler on):", "",
                    "| operator | ms | calls |", "|---|---:|---:|",
                    *(f"| `{name}` | {ms:.1f} | {calls} |" for name, ms, calls in r.ops), ""]
    return "\n".join(out)


def plot(results: list[Result], path: Path, title: str, impls: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(results) + 2), sharey=True)
    ypos = np.arange(len(results))
    for ax, table, what in ((axes[0], "ms", "step time"), (axes[1], "mib", "peak memory")):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            offset = (i - (len(impls) - 1) / 2) * width
            ax.barh(ypos + offset, [r.ratio(impl, getattr(r, table)) for r in results], width, label=impl)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel(f"LUT {what} / dense")
        ax.set_xscale("log")
    axes[0].set_yticks(ypos, [r.case.name for r in results], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lutnn bench-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_train"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per variant (median)")
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="'thread': CPU time of the main thread (1 thread on a busy machine)")
    ap.add_argument("--config", type=Path, default=Path("configs/default.yaml"),
                    help="run config whose teacher and LUT epochs the 'epoch' group times")
    ap.add_argument("--impls", nargs="+", choices=STE_IMPLS, default=["reference", "fused", "compiled"],
                    help="LUT ste_impl columns ('compiled' compiles during its warm-up step, untimed)")
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="also list the N operators with the most self CPU time in one step of the last --impls")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    selected = [c for c in cases() if c.group in args.only]
    if args.clock == "thread" and (device.type != "cpu" or args.threads != 1):
        ap.error("--clock thread measures only the calling thread: use it with --device cpu --threads 1")
    results = [run_case(c, args.reps, device, args.impls, args.clock, args.ops)
               for c in progress(selected, desc="bench-train")]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    header = (f"Training step (forward + backward), {where}, K={K}, median of {args.reps} ({args.clock} clock); "
              f"ratios are against the dense step of the same run.")
    args.out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(results, header, args.impls) if results else ""
    if "epoch" in args.only:
        sec = epoch_seconds(args.config, args.impls)
        table += (f"\nOne epoch of `{args.config}` (train + eval, {where}): dense teacher vs LUT retraining\n\n"
                  "| stage | seconds | / dense teacher epoch |\n|---|---:|---:|\n"
                  + "".join(f"| {'teacher (dense)' if k == 'dense' else f'LUT, ste_impl={k}'} | {v:.1f} "
                            f"| {v / sec['dense']:.2f}x |\n" for k, v in sec.items()))
    (args.out / "bench_train.md").write_text(table)
    if results:
        plot(results, args.out / "bench_train.png", header, args.impls)
    print(table)
    print(f"wrote {args.out / 'bench_train.md'}" + (f" and {args.out / 'bench_train.png'}" if results else ""))
    return 0
