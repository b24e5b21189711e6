#!/usr/bin/env python
"""Compile a dense model and its LUT conversion with TensorRT and time them against eager.

    python tensorrt_op.py --model deit_tiny_patch16_224              # random weights, no run needed
    python tensorrt_op.py --checkpoint runs/deit_digits --precision fp16

Needs a CUDA GPU and torch-tensorrt; without them it exits with a one-line message.
Logic lives in ``lutnn.trt``.
"""
from __future__ import annotations

import argparse
import sys

import torch

from lutnn import quantize_tables_
from lutnn.cli import emit
from lutnn.trt import (
    LUT_OPS, PRECISIONS, TensorRTUnavailable, benchmark, latency_markdown, load_models, require_tensorrt,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_DIR", help="training run directory (lutnn.runs.load_run)")
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
    args = build_parser().parse_args(argv)
    try:
        require_tensorrt()
        dense, lut, input_size = load_models(args.checkpoint, args.model, args.input_size, not args.convert_all)
    except (TensorRTUnavailable, ValueError, FileNotFoundError) as err:
        print(f"tensorrt_op.py: {err}", file=sys.stderr)
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
