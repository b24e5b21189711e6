"""Layer-level benchmark: TVM LUT kernels vs PyTorch dense on transformer shapes.

    lutnn bench                      # full grid: N {197,1024,4096} x D=M {384,768} x V {2,4,8}
    lutnn bench --n 1024 --d 768 --v 8 --threads 2 --tune-trials 8

Per shape: median latency of the TVM LUT layer (encode + read-accumulate, fp32 and
int8 tables), the PyTorch LUT layer (``embedding_bag`` lookup), and the PyTorch dense
paths (fp32, bf16, dynamic int8); the ratio of each LUT layer to fp32 dense and to
the fastest dense path measured in the same run; the achieved table-read bandwidth
(bytes of table rows read by the read-accumulate / its time); and the int8 lookup split
by kernel: gather vs in-register shuffle (:mod:`lutnn.tvm.shuffle`; the int8 layer uses
the tuned/default choice) with the shuffle kernel's instruction bound (its inner loop's
marginal cost per step measured on an L1-resident problem x the steps of this shape).
Writes ``bench.md`` and ``bench.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .dense_baselines import DENSE_PATHS, dense_variant
from ..layers import LUTLinear
from ..progress import progress
from .report import CLOCKS, write_report


@dataclass
class Row:
    n: int
    d: int
    v: int
    k: int
    ms: dict[str, float] = field(default_factory=dict)  # method -> median latency
    lookup_ms: dict[str, float] = field(default_factory=dict)  # table dtype -> read-accumulate alone
    encode_ms: float = 0.0
    int8_kernel: str = "gather"  # read-accumulate the int8 layer uses (tuned or default)
    int8_kernel_ms: dict[str, float] = field(default_factory=dict)  # "gather" / shuffle kernel name -> ms
    shuffle_bound_ms: float | None = None  # instruction bound of the shuffle kernel on this shape

    @property
    def c(self) -> int:
        return self.d // self.v

    def best_dense(self) -> tuple[str, float]:
        return min(((p, self.ms[p]) for p in DENSE_PATHS if p in self.ms), key=lambda t: t[1])

    def bandwidth_gbs(self, dtype: str) -> float:
        nbytes = self.n * self.c * self.d * (4 if dtype == "float32" else 1)
        return nbytes / (self.lookup_ms[dtype] * 1e-3) / 1e9


LUT_METHODS = ("tvm-lut-fp32", "tvm-lut-int8", "torch-lut")


def _lut_layer(d: int, v: int, k: int, seed: int) -> LUTLinear:
    torch.manual_seed(seed)
    return LUTLinear(d, d, subvec_len=v, num_prototypes=k).eval()


def bench_shape(n: int, d: int, v: int, k: int, target, db, dense_ms: dict[str, float], torch_lut: bool,
                seed: int = 0) -> Row:
    """Time every method on one shape (dense timings are shared across V)."""
    from ..tvm.kernels import EncodeSpec, LookupSpec
    from ..tvm.tuning import build_kernel, kernel_args, time_kernel
    import tvm

    row = Row(n, d, v, k, ms=dict(dense_ms))
    layer = _lut_layer(d, v, k, seed)
    x = torch.randn(n, d)
    dev = tvm.cpu()
    tv = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    p = layer.prototypes.detach()
    enc = build_kernel(EncodeSpec(n, layer.num_codebooks, k, v), target, db)
    codes = tvm.runtime.empty((n, layer.num_codebooks), "uint8", dev)
    enc_args = [tv(x.numpy()), tv(p.transpose(1, 2).numpy()), tv(p.pow(2).sum(-1).numpy()), codes]
    row.encode_ms = time_kernel(enc, enc_args)
    for dtype in ("float32", "int8"):
        spec = LookupSpec(n, layer.num_codebooks, k, d, dtype)
        kernel = build_kernel(spec, target, db)
        args = kernel_args(kernel, spec, seed)
        args[0] = codes
        row.lookup_ms[dtype] = time_kernel(kernel, args)
        row.ms["tvm-lut-fp32" if dtype == "float32" else "tvm-lut-int8"] = row.encode_ms + row.lookup_ms[dtype]
        if dtype == "int8":
            row.int8_kernel = kernel.kernel
            row.int8_kernel_ms, row.shuffle_bound_ms = int8_kernels(spec, target, db, codes)
    if torch_lut:
        with torch.no_grad():
            layer(x)
            row.ms["torch-lut"] = time_kernel(layer, [x])
    return row


def int8_kernels(spec, target, db, codes) -> tuple[dict[str, float], float | None]:
    """int8 read-accumulate time of the gather kernel and of the shuffle kernel (the tuned
    one, else the default for this CPU), plus the shuffle kernel's instruction bound."""
    from ..tvm.schedules import default_knobs, knob_space
    from ..tvm.shuffle import shuffle_kernels
    from ..tvm.tuning import build_kernel, kernel_args, time_kernel

    chosen = db.knobs(spec, target)
    gather = db.knobs(spec, target, gather_only=True) or default_knobs(spec, target, gather_only=True)
    candidates = [gather]
    names = shuffle_kernels(spec, target)
    if names:
        shuffle = chosen if chosen is not None and chosen.kernel != "gather" else next(
            k for k in knob_space(spec, target) if k.kernel == names[0])
        candidates.append(shuffle)
    times = {}
    for knobs in candidates:
        kernel = build_kernel(spec, target, knobs=knobs)
        args = kernel_args(kernel, spec)
        args[0] = codes
        times[knobs.kernel] = time_kernel(kernel, args)
    return times, (shuffle_bound_ms(spec, target, candidates[1]) if names else None)


def shuffle_bound_ms(spec, target, knobs) -> float:
    """Instruction bound of a shuffle kernel on ``spec``: the marginal time per inner-loop step
    (one shuffle group: a row vector x one column x 2 or 4 codebooks), measured as the time
    difference between 64 and 192 codebooks on 1024 rows x 512 columns (a column tile's
    tables, <= 12 KiB, stay in L1 across its 1024 rows), times the steps of ``spec``. The
    difference cancels the per-output epilogue; code packing (~3% of a step) stays in."""
    from ..tvm.kernels import LookupSpec
    from ..tvm.shuffle import inner_loop_steps
    from ..tvm.tuning import build_kernel, kernel_args, time_kernel

    small = [LookupSpec(1024, c, spec.k, 512, "int8") for c in (64, 192)]
    ms = []
    for s in small:
        kernel = build_kernel(s, target, knobs=knobs)
        ms.append(time_kernel(kernel, kernel_args(kernel, s)))
    per_step = (ms[1] - ms[0]) / (inner_loop_steps(small[1], knobs.kernel) - inner_loop_steps(small[0], knobs.kernel))
    return per_step * inner_loop_steps(spec, knobs.kernel)


def dense_timings(n: int, d: int, seed: int = 0) -> dict[str, float]:
    from ..tvm.tuning import time_kernel

    torch.manual_seed(seed)
    lin, x = nn.Linear(d, d).eval(), torch.randn(n, d)
    out = {}
    with torch.no_grad():
        for path in DENSE_PATHS:
            fn = dense_variant(lin, path)
            if fn is not None:
                out[path] = time_kernel(fn, [x])
    return out


def run(ns, ds, vs, k: int = 16, threads: int | None = None, tune_trials: int = 0, tuning_dir=None,
        torch_lut: bool = True) -> list[Row]:
    from ..tvm.kernels import EncodeSpec, LookupSpec
    from ..tvm.target import host_target, set_num_threads
    from ..tvm.tuning import TuningDatabase, tune_kernels

    if threads:
        torch.set_num_threads(threads)
    set_num_threads(threads)
    target = host_target(threads)
    specs = [s for n in ns for d in ds for v in vs for s in (
        EncodeSpec(n, d // v, k, v), LookupSpec(n, d // v, k, d), LookupSpec(n, d // v, k, d, "int8"))]
    db = tune_kernels(specs, target, tuning_dir, tune_trials) if tune_trials > 0 else TuningDatabase(tuning_dir)
    rows = []
    for n, d in progress([(n, d) for n in ns for d in ds], desc="bench shapes"):
        dense = dense_timings(n, d)
        rows += [bench_shape(n, d, v, k, target, db, dense, torch_lut) for v in vs]
    return rows


def to_markdown(rows: list[Row], header: str = "") -> str:
    lines = [header] if header else []
    lines += [
        "| N | D=M | V | C | fp32 dense ms | best dense (ms) | TVM LUT fp32 ms | TVM LUT int8 ms | torch LUT ms "
        "| fp32 dense / LUT fp32 | fp32 dense / LUT int8 | best dense / LUT int8 | table read GB/s fp32 / int8 "
        "| encode ms | int8 lookup used | int8 lookup ms: gather / shuffle | shuffle bound ms (% of it reached) |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        best, best_ms = r.best_dense()
        torch_lut = f"{r.ms['torch-lut']:.3f}" if "torch-lut" in r.ms else "-"
        lines.append(
            f"| {r.n} | {r.d} | {r.v} | {r.c} | {r.ms['fp32']:.3f} | {best} ({best_ms:.3f}) "
            f"| {r.ms['tvm-lut-fp32']:.3f} | {r.ms['tvm-lut-int8']:.3f} | {torch_lut} "
            f"| {r.ms['fp32'] / r.ms['tvm-lut-fp32']:.2f}x | {r.ms['fp32'] / r.ms['tvm-lut-int8']:.2f}x "
            f"| {best_ms / r.ms['tvm-lut-int8']:.2f}x "
            f"| {r.bandwidth_gbs('float32'):.1f} / {r.bandwidth_gbs('int8'):.1f} "
            f"| {r.encode_ms:.3f} | {r.int8_kernel} | {_kernel_times(r)} | {_bound(r)} |"
        )
    lines.append("\nRatios > 1 mean the LUT layer (encode + read-accumulate) is faster. "
                 "Dense paths: " + ", ".join(DENSE_PATHS) + " (PyTorch, same threads). "
                 "Shuffle bound: the shuffle kernel's inner-loop cost per step measured with its table tile "
                 "in L1, times this shape's steps (docs/shuffle_kernel.md).")
    return "\n".join(lines)


def _kernel_times(r: Row) -> str:
    shuffle = [(k, ms) for k, ms in r.int8_kernel_ms.items() if k != "gather"]
    return f"{r.int8_kernel_ms['gather']:.3f} / " + (f"{shuffle[0][1]:.3f} ({shuffle[0][0]})" if shuffle else "-")


def _bound(r: Row) -> str:
    if r.shuffle_bound_ms is None:
        return "- (no shuffle kernel: K != 16 or no AVX2)"
    shuffle_ms = next(ms for k, ms in r.int8_kernel_ms.items() if k != "gather")
    return f"{r.shuffle_bound_ms:.3g} ({100 * r.shuffle_bound_ms / shuffle_ms:.0f}%)"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"N{r.n}\nD{r.d}\nV{r.v}" for r in rows]
    x = np.arange(len(rows))
    series = {
        "TVM LUT fp32": [r.ms["fp32"] / r.ms["tvm-lut-fp32"] for r in rows],
        "TVM LUT int8": [r.ms["fp32"] / r.ms["tvm-lut-int8"] for r in rows],
        "best dense path": [r.ms["fp32"] / r.best_dense()[1] for r in rows],
    }
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - 1) * width, vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("speed-up over PyTorch fp32 dense")
    ax.set_title("LUT layer (K=16) vs dense linear, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[197, 1024, 4096], help="rows (tokens x batch)")
    ap.add_argument("--d", type=int, nargs="+", default=[384, 768], help="D = M (in = out features)")
    ap.add_argument("--v", type=int, nargs="+", default=[2, 4, 8], help="sub-vector lengths")
    ap.add_argument("--k", type=int, default=16, help="prototypes per codebook")
    ap.add_argument("--threads", type=int, default=None, help="threads for PyTorch and TVM (default: all)")
    ap.add_argument("--tune-trials", type=int, default=0, help="tuning trials per kernel (0: hand schedule)")
    ap.add_argument("--tuning-dir", default=None, help="tuning database dir (default $LUTNN_TVM_CACHE)")
    ap.add_argument("--no-torch-lut", action="store_true", help="skip the (slow) PyTorch LUT layer")
    ap.add_argument("--out", default="bench_out", help="directory for bench.md and bench.png")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the thread's CPU time (for a loaded shared machine; needs --threads 1)")
    args = ap.parse_args(argv)
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread counts the calling thread only: use it with --threads 1")
        from ..tvm.tuning import CLOCK_ENV

        os.environ[CLOCK_ENV] = "thread"
    for v in args.v:
        for d in args.d:
            if d % v:
                ap.error(f"--v {v} does not divide --d {d}")
    rows = run(args.n, args.d, args.v, args.k, args.threads, args.tune_trials, args.tuning_dir,
               not args.no_torch_lut)
    out = Path(args.out)
    threads = args.threads or torch.get_num_threads()
    header = (f"## LUT layer benchmark (K={args.k}, {threads} threads, {os.cpu_count()} CPUs, "
              f"tune trials {args.tune_trials}, {args.clock} clock)\n")
    write_report(out, "bench", to_markdown(rows, header), lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
