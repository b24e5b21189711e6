"""Per-layer benchmark of the TVM ``LUTConv2d`` kernels on a CNN (default: ResNet-18 at 224).

    lutnn bench-conv                                   # ResNet-18, batch 1, 1 thread, int8 tables
    lutnn bench-conv --batch 8 --threads 2 --tune-trials 8 --out bench_conv_out

Every conv except the stem (``--exclude``) becomes a ``LUTConv2d`` (V = 9 for 3x3, V = 4
for 1x1; random weights: latency does not depend on them). Per LUT conv: median latency
of PyTorch dense ``conv2d``, the TVM encode and read-accumulate kernels alone, the whole
:func:`lutnn.tvm.conv.conv_runner` call (both kernels + DLPack + Python), and optionally
the PyTorch LUT layer; then whole-model latencies: dense PyTorch, and the LUT model with
its convs on ``conv_runner`` (everything else PyTorch eager). With ``--threads 1`` times are
the thread's CPU time (``time.thread_time``), which other processes on a shared machine
do not inflate; with more threads, wall time. Writes ``bench_conv.md`` and
``bench_conv.png`` into ``--out``. Runtime: about a minute on 1 thread without tuning,
plus ~2 s per tuning trial and kernel.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import convert_, lut_layers, quantize_tables_
from ..layers import LUTConv2d
from ..progress import progress
from .report import write_report


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, ...]  # input NCHW
    layer: str  # short description: Cin->Cout kxk /s, V
    dense_ms: float
    encode_ms: float
    lookup_ms: float
    runner_ms: float
    torch_lut_ms: float | None


def build_model(name: str, exclude: list[str]) -> nn.Module:
    """The CNN with its convs as LUTConv2d (V=9 for 3x3, V=4 for 1x1) and int8 tables."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in exclude]
    one_by_one = {n: {"subvec_len": 4} for n in convs if model.get_submodule(n).kernel_size == (1, 1)}
    convert_(model, {"layer_types": ["conv2d"], "exclude": list(exclude), "overrides": one_by_one})
    quantize_tables_(model, "output")
    return model


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every LUT conv in one forward pass, NCHW-contiguous: eager ``LUTConv2d``
    outputs are transposed views, but a model running on ``conv_runner`` passes NCHW."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, args: tuple) -> None:
        seen.setdefault(name, args[0].detach().clone(memory_format=torch.contiguous_format))

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: keep(n, a)) for n, m in lut_layers(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def bench_layer(name: str, layer: LUTConv2d, x: torch.Tensor, target, db, torch_lut: bool) -> tuple[LayerRow, object]:
    import tvm

    from ..tvm.conv import compiled_kernel, conv_runner
    from ..tvm.tuning import kernel_clock, random_inputs, time_kernel

    clock = kernel_clock(target)
    run = conv_runner(layer, tuple(x.shape), target=target, db=db)
    kernel_ms = [time_kernel(compiled_kernel(spec, target, db), [tvm.runtime.tensor(a) for a in random_inputs(spec)],
                             clock=clock) for spec in (run.specs.encode, run.specs.lookup)]
    with torch.no_grad():
        dense_ms = time_kernel(lambda t: F.conv2d(t, layer.weight, layer.bias, layer.stride, layer.padding,
                                                  layer.dilation), [x], clock=clock)
        lut_ms = time_kernel(layer, [x], repeat=3, clock=clock) if torch_lut else None
    (kh, kw), s = layer.kernel_size, layer.stride[0]
    desc = f"{layer.in_channels}->{layer.out_channels} {kh}x{kw}/{s} V={layer.subvec_len}"
    row = LayerRow(name, tuple(x.shape), desc, dense_ms, *kernel_ms, time_kernel(run, [x], clock=clock), lut_ms)
    return row, run


def run(model_name: str = "resnet18", batch: int = 1, size: int = 224, threads: int = 1, tune_trials: int = 0,
        tuning_dir=None, exclude=("conv1",), torch_lut: bool = False) -> tuple[list[LayerRow], dict[str, float]]:
    import torchvision

    from ..tvm.conv import conv_specs
    from ..tvm.target import host_target, set_num_threads
    from ..tvm.tuning import kernel_clock, time_kernel, tune_kernels

    torch.set_num_threads(threads)
    set_num_threads(threads)
    target = host_target(threads)
    model = build_model(model_name, list(exclude))
    x = torch.randn(batch, 3, size, size)
    inputs = layer_inputs(model, x)
    layers = lut_layers(model)
    specs = [s for n, t in inputs.items() for s in vars(conv_specs(layers[n], tuple(t.shape))).values()]
    db = tune_kernels(specs, target, tuning_dir, tune_trials)
    rows, runners = [], {}
    for name in progress(list(inputs), desc="bench LUT convs"):
        row, runners[name] = bench_layer(name, layers[name], inputs[name], target, db, torch_lut)
        rows.append(row)
    torch.manual_seed(0)
    dense = getattr(torchvision.models, model_name)(weights=None).eval()
    clock = kernel_clock(target)
    with torch.no_grad():
        whole = {"PyTorch dense fp32": time_kernel(dense, [x], repeat=3, clock=clock)}
        if torch_lut:
            whole["PyTorch LUT eager"] = time_kernel(model, [x], repeat=3, clock=clock)
        for name, fn in runners.items():
            layers[name].forward = fn  # instance attribute: nn.Module.__call__ runs the TVM kernels
        whole["LUT convs on conv_runner, rest PyTorch"] = time_kernel(model, [x], repeat=3, clock=clock)
    return rows, whole


def to_markdown(rows: list[LayerRow], whole: dict[str, float], header: str) -> str:
    lines = [header, "| layer | input | conv | torch dense ms | encode ms | lookup ms | conv_runner ms "
             "| torch LUT ms | dense / runner |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lut = f"{r.torch_lut_ms:.3f}" if r.torch_lut_ms is not None else "-"
        lines.append(f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.layer} | {r.dense_ms:.3f} | {r.encode_ms:.3f} "
                     f"| {r.lookup_ms:.3f} | {r.runner_ms:.3f} | {lut} | {r.dense_ms / r.runner_ms:.2f}x |")
    tot = {k: sum(getattr(r, k) for r in rows) for k in ("dense_ms", "encode_ms", "lookup_ms", "runner_ms")}
    lines.append(f"| **all LUT convs** | | | {tot['dense_ms']:.2f} | {tot['encode_ms']:.2f} | {tot['lookup_ms']:.2f} "
                 f"| {tot['runner_ms']:.2f} | | {tot['dense_ms'] / tot['runner_ms']:.2f}x |")
    lines += ["", "| whole model | ms |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in whole.items()]
    return "\n".join(lines)


def plot(rows: list[LayerRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4))
    ax.bar(x - 0.2, [r.dense_ms for r in rows], 0.4, label="PyTorch dense conv2d")
    ax.bar(x + 0.2, [r.encode_ms for r in rows], 0.4, label="TVM LUT encode")
    ax.bar(x + 0.2, [r.lookup_ms for r in rows], 0.4, bottom=[r.encode_ms for r in rows],
           label="TVM LUT read-accumulate")
    ax.set_xticks(x, [r.name for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel("ms")
    ax.set_title("LUTConv2d kernels vs dense conv2d, per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", help="torchvision model name")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224, help="input height = width")
    ap.add_argument("--threads", type=int, default=1, help="threads for PyTorch and TVM")
    ap.add_argument("--exclude", nargs="*", default=["conv1"], help="convs left dense")
    ap.add_argument("--tune-trials", type=int, default=0, help="tuning trials per kernel (0: database or hand knobs)")
    ap.add_argument("--tuning-dir", default=None, help="tuning database dir (default $LUTNN_TVM_CACHE)")
    ap.add_argument("--torch-lut", action="store_true", help="also time the (slow) PyTorch LUT layers")
    ap.add_argument("--out", default="bench_conv_out", help="directory for bench_conv.md and bench_conv.png")
    args = ap.parse_args(argv)
    rows, whole = run(args.model, args.batch, args.size, args.threads, args.tune_trials, args.tuning_dir,
                      args.exclude, args.torch_lut)
    out = Path(args.out)
    header = (f"## LUTConv2d kernels: {args.model} {args.size}x{args.size}, batch {args.batch}, int8 tables, "
              f"{args.threads} thread(s), {os.cpu_count()} CPUs, tune trials {args.tune_trials}\n")
    write_report(out, "bench_conv", to_markdown(rows, whole, header), lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
