"""``demo.py``: a retrained LUT model compiled by TVM, side by side with PyTorch and TVM dense.

Steps: load the run (:func:`lutnn.load_run`), tune the LUT kernels of the model's
shapes (or reuse ``<run>/tvm_tuning``), compile the LUT and the dense model with the
same Relax pipeline, check the compiled LUT model against the PyTorch LUT model, then
measure top-1 accuracy on the eval set and per-batch latency / throughput of:
PyTorch dense fp32, the fastest other PyTorch dense path (bf16 or dynamic int8),
PyTorch LUT, TVM dense, and the two TVM LUT paths: ``accelerate_`` (kernels inside the
PyTorch model) and ``compile_model`` (whole model). The faster of the two, by this
measurement, is the one checked against the PyTorch LUT model and named in the header.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .dense_baselines import dense_variant
from ..convert import quantize_tables_
from ..tvm.accelerate import AccelerateConfig, accelerate_
from ..tvm.relax_model import compile_model, lut_kernel_specs
from ..tvm.target import host_target, set_num_threads
from ..tvm.tuning import time_kernel, tune_kernels


@dataclass
class Result:
    name: str
    top1: float
    latency_ms: float  # median per batch
    batch_size: int

    @property
    def throughput(self) -> float:
        return self.batch_size / (self.latency_ms * 1e-3)


def fixed_batches(loader, batch_size: int) -> list[tuple[Tensor, Tensor, int]]:
    """The eval set re-cut into ``batch_size`` batches; the last is zero-padded (3rd item: real rows)."""
    xs, ys = zip(*((x, y) for x, y in loader))
    x, y = torch.cat(xs), torch.cat(ys)
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        real = len(xb)
        if real < batch_size:
            xb = torch.cat([xb, xb.new_zeros(batch_size - real, *xb.shape[1:])])
        out.append((xb.contiguous(), yb, real))
    return out


@torch.no_grad()
def measure(name: str, fn: Callable[[Tensor], Tensor], batches, repeat: int = 5) -> Result:
    correct = total = 0
    for x, y, real in batches:
        pred = fn(x)[:real].argmax(-1)
        correct += int((pred == y).sum())
        total += real
    latency = time_kernel(fn, [batches[0][0]], min_ms=50.0, repeat=repeat)
    return Result(name, correct / total, latency, len(batches[0][0]))


def report(results: list[Result], meta: str) -> str:
    lines = [meta, "", "| model | top-1 | latency ms / batch | throughput img/s | vs PyTorch fp32 |",
             "|---|---:|---:|---:|---:|"]
    base = results[0].latency_ms
    for r in results:
        lines.append(f"| {r.name} | {100 * r.top1:.2f}% | {r.latency_ms:.3f} | {r.throughput:.0f} "
                     f"| {base / r.latency_ms:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description="Compile a retrained LUT model with TVM and compare "
                                 "it with PyTorch (dense fp32, best of bf16 / dynamic int8, LUT) and TVM dense.")
    ap.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory (train.py output)")
    ap.add_argument("--which", default="best", help="checkpoint in the run: best, last or a file")
    ap.add_argument("--tune-trials", type=int, default=8, help="tuning trials per LUT kernel (0: hand schedule)")
    ap.add_argument("--tuning-dir", default=None, help="tuning database dir (default RUN_DIR/tvm_tuning)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="threads for PyTorch and TVM (default: all)")
    ap.add_argument("--int8-tables", action="store_true", help="int8 tables (granularity 'output') for both LUT models")
    args = ap.parse_args(argv)
    from ..pipeline.runs import load_run

    run_dir = Path(args.checkpoint)
    if not run_dir.is_dir():
        ap.error(f"--checkpoint {run_dir}: not a directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    run = load_run(run_dir, args.which)
    lut, dense = run.lut_model.cpu().eval(), run.dense_model.cpu().eval()
    if args.int8_tables:
        quantize_tables_(lut, "output")
    batches = fixed_batches(run.eval_loader, args.batch_size)
    example = batches[0][0]
    target = host_target(args.threads)

    # PyTorch first: TVM's thread pool must not exist yet while PyTorch's threads are timed
    results = [measure("PyTorch dense fp32", dense, batches)]
    others = [measure(f"PyTorch dense {p}", fn, batches) for p in ("bf16", "int8-dynamic")
              if (fn := dense_variant(dense, p)) is not None]
    results.append(min(others, key=lambda r: r.latency_ms))
    results.append(measure("PyTorch LUT" + (" (int8 tables)" if args.int8_tables else ""), lut, batches))

    start = time.perf_counter()
    tuning_dir = args.tuning_dir or run_dir / "tvm_tuning"
    db = tune_kernels(lut_kernel_specs(lut, example), target, tuning_dir, args.tune_trials)
    tvm_lut = compile_model(lut, example, target, db)
    tvm_dense = compile_model(dense, example, target)
    accelerated = copy.deepcopy(lut)
    accelerate_(accelerated, AccelerateConfig(target=target, tuning_dir=tuning_dir, tune_trials=args.tune_trials,
                                              threads=args.threads))
    with torch.no_grad():
        accelerated(example)  # builds (and tunes) its kernels
    setup_s = time.perf_counter() - start
    suffix = " (int8 tables)" if args.int8_tables else ""
    lut_paths = [measure("TVM LUT, accelerate_" + suffix, accelerated, batches),
                 measure("TVM LUT, compile_model" + suffix, tvm_lut, batches)]
    fastest = min(lut_paths, key=lambda r: r.latency_ms)
    fastest_fn = accelerated if fastest is lut_paths[0] else tvm_lut
    with torch.no_grad():
        diff = (fastest_fn(example) - lut(example)).abs().max().item()
        agree = (fastest_fn(example).argmax(-1) == lut(example).argmax(-1)).float().mean().item()
    results += [measure("TVM dense", tvm_dense, batches), *lut_paths]
    meta = (f"run {run_dir} ({args.which}), {sum(r for *_, r in batches)} eval images, batch {args.batch_size}, "
            f"threads {args.threads or torch.get_num_threads()}, target {target.attrs['mcpu']}, "
            f"{len(tvm_lut.kernels)} LUT kernels (tune trials {args.tune_trials}; tune+compile {setup_s:.1f} s); "
            f"fastest LUT path: {fastest.name}; vs PyTorch LUT: max |diff| {diff:.2e}, "
            f"argmax agreement {100 * agree:.1f}%")
    text = report(results, meta)
    print(text)
    return text
