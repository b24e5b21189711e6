"""TensorRT compilation of dense and LUT models, timed against eager PyTorch.

``torch_tensorrt`` is imported lazily: lutnn itself never needs it, and on a machine
without a CUDA GPU or the package :func:`require_tensorrt` raises
:class:`TensorRTUnavailable` with a one-line reason.

Compilation uses the dynamo front end (``torch.export`` underneath)::

    torch_tensorrt.compile(model, ir="dynamo", inputs=[x], enabled_precisions={torch.float32},
                           min_block_size=5, torch_executed_ops={...})

A LUT layer lowers to ``baddbmm`` (encode distances) -> ``argmin`` -> ``embedding_bag``
(table gather-accumulate); its table is a parameter-only subexpression
(``einsum(prototypes, weight)``) that the compiler folds into a constant. Ops TensorRT
cannot convert fall back to PyTorch automatically; ``min_block_size`` is the smallest
run of convertible ops worth a TensorRT engine (smaller runs stay in PyTorch), and
``torch_executed_ops`` forces ops to PyTorch — :data:`LUT_OPS` are the ones to force
when a TensorRT version mishandles argmin or embedding_bag.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..convert import quantize_tables_
from ..pipeline.cli import emit, first_line

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# aten targets of a LUT layer's encode/lookup as they appear in the exported graph
LUT_OPS = (
    "torch.ops.aten.argmin.default",
    "torch.ops.aten.embedding_bag.default",
    "torch.ops.aten.embedding_bag.padding_idx",
    "torch.ops.aten._embedding_bag.default",
)


class TensorRTUnavailable(RuntimeError):
    """No CUDA GPU or no importable torch-tensorrt; the message is one line."""


def require_tensorrt():
    """The ``torch_tensorrt`` module, or :class:`TensorRTUnavailable` saying what is missing."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); "
            "TensorRT compilation needs an NVIDIA GPU and the torch-tensorrt package"
        )
    if importlib.util.find_spec("torch_tensorrt") is None:
        raise TensorRTUnavailable(
            f"torch-tensorrt is not installed; install the build matching torch {torch.__version__} "
            "(pip install torch-tensorrt)"
        )
    try:
        return importlib.import_module("torch_tensorrt")
    except Exception as err:  # a wheel built for another torch/CUDA fails at import in many ways
        raise TensorRTUnavailable(f"torch-tensorrt failed to import: {first_line(err)}") from None


def compile_tensorrt(
    model: nn.Module,
    example: Tensor,
    min_block_size: int = 5,
    torch_executed_ops: Sequence[str] = (),
) -> nn.Module:
    """``model`` compiled by TensorRT for inputs shaped (and typed) like ``example``."""
    trt = require_tensorrt()
    return trt.compile(
        model,
        ir="dynamo",
        inputs=[example],
        enabled_precisions={example.dtype},
        min_block_size=min_block_size,
        torch_executed_ops=set(torch_executed_ops),
    )


@torch.inference_mode()
def median_latency_ms(fn: Callable[[Tensor], object], x: Tensor, warmup: int = 10, repeats: int = 50) -> float:
    """Median wall time of ``fn(x)`` in milliseconds, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class LatencyRow:
    model: str
    backend: str
    median_ms: float
    speedup: float  # eager median / this median, same model
    max_abs_diff: float  # against the eager output
    error: str = ""  # why compilation failed (the other numbers are then nan)


def benchmark(
    models: dict[str, nn.Module],
    example: Tensor,
    warmup: int = 10,
    repeats: int = 50,
    min_block_size: int = 5,
    torch_executed_ops: Sequence[str] = (),
) -> list[LatencyRow]:
    """Eager and TensorRT median latency of every model on ``example`` (already on the GPU)."""
    rows = []
    for name, model in models.items():
        model = model.eval().to(device=example.device, dtype=example.dtype)
        with torch.inference_mode():
            ref = model(example)
        eager = median_latency_ms(model, example, warmup, repeats)
        rows.append(LatencyRow(name, "eager", eager, 1.0, 0.0))
        try:
            compiled = compile_tensorrt(model, example, min_block_size, torch_executed_ops)
            with torch.inference_mode():
                diff = float((compiled(example).float() - ref.float()).abs().max())
        except Exception as err:  # report and go on with the next model
            reason = f"{type(err).__name__}: {first_line(err)}"
            rows.append(LatencyRow(name, "tensorrt", math.nan, math.nan, math.nan, reason))
            continue
        ms = median_latency_ms(compiled, example, warmup, repeats)
        rows.append(LatencyRow(name, "tensorrt", ms, eager / ms, diff))
    return rows


def latency_markdown(rows: Sequence[LatencyRow], device: str = "", note: str = "") -> str:
    lines = [
        "| model | backend | median ms | speedup vs eager | max abs diff vs eager |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.backend} | {r.median_ms:.3f} | {r.speedup:.2f}x | {r.max_abs_diff:.2e} |" if not r.error
        else f"| {r.model} | {r.backend} | failed: {r.error} | | |"
        for r in rows
    ]
    if device or note:
        lines.append("\n" + " ".join(s for s in (device, note) if s))
    return "\n".join(lines)


def load_models(
    checkpoint: str | None = None,
    model_name: str | None = None,
    input_size: Sequence[int] | None = None,
    keep_ends_dense: bool = True,
) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """``(dense, lut, input_size)`` from a training run directory or a timm model name."""
    if checkpoint is not None:
        from ..pipeline.runs import load_run

        run = load_run(checkpoint)
        return run.dense_model, run.lut_model, tuple(input_size or run.input_size)
    from .profile import default_input_size, dense_and_lut

    dense, lut = dense_and_lut(model_name, keep_ends_dense=keep_ends_dense)
    return dense, lut, tuple(input_size or default_input_size(dense))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compile a dense model and its LUT conversion with TensorRT "
                                     "and time them against eager (needs CUDA and torch-tensorrt).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_DIR", help="training run directory (lutnn.load_run)")
    source.add_argument("--model", metavar="NAME", help="timm model name, converted with the default LUTConfig")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="default: the run's / model's input size")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--int8-tables", action="store_true", help="quantise LUT tables to int8 first")
    parser.add_argument("--convert-all", action="store_true",
                        help="--model only: also convert the stem and classifier (kept dense by default)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported")
    parser.add_argument("--min-block-size", type=int, default=5,
                        help="smallest run of convertible ops given to TensorRT; shorter runs stay in PyTorch")
    parser.add_argument("--lut-ops-in-torch", action="store_true",
                        help=f"force the LUT encode/lookup ops to PyTorch (torch_executed_ops={list(LUT_OPS)})")
    parser.add_argument("--output", help="also write the Markdown table to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        require_tensorrt()
        dense, lut, input_size = load_models(args.checkpoint, args.model, args.input_size, not args.convert_all)
    except (TensorRTUnavailable, ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    if args.int8_tables:
        quantize_tables_(lut)
    x = torch.randn(args.batch_size, *input_size, device="cuda", dtype=PRECISIONS[args.precision])
    rows = benchmark({"dense": dense, "lut": lut}, x, args.warmup, args.repeats, args.min_block_size,
                     LUT_OPS if args.lut_ops_in_torch else ())
    text = latency_markdown(rows, f"Device: {torch.cuda.get_device_name()}.",
                            f"Input {tuple(x.shape)} {args.precision}; median of {args.repeats} calls.")
    emit(text, args.output)
    return 0



if __name__ == "__main__":
    sys.exit(main())
