"""The ``lutnn`` console command: one subcommand per pipeline stage and tool.

Subcommands are a registry of ``module:function`` entry points, imported only when run, so
``lutnn --help`` stays fast and each subcommand's ``--help`` is its own argparse parser.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# name -> (entry point "module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("lutnn.pipeline.cli:run_main", "whole pipeline: teacher -> prototypes -> retrain -> eval (pipeline.py)"),
    "prototypes": ("lutnn.pipeline.cli:prototypes_main", "teacher + calibration + k-means init (prototype_learning.py)"),
    "train": ("lutnn.pipeline.cli:train_main", "LUT retraining + evaluation, --resume (train.py)"),
    "demo": ("lutnn.tools.demo:main", "TVM-compiled LUT model vs dense baselines on a run (demo.py)"),
    "bench": ("lutnn.tools.bench:main", "LUT layer benchmark: TVM kernels vs PyTorch dense"),
    "bench-conv": ("lutnn.tools.bench_conv:main", "LUTConv2d TVM kernels per layer of a CNN (ResNet-18) vs dense conv2d"),
    "bench-model": ("lutnn.tools.bench_model:main", "whole-model latency: LUT (eager, accelerate_, TVM) vs dense engines"),
    "bench-train": ("lutnn.tools.bench_train:main", "training step time and peak memory: LUT (reference, fused STE) vs dense"),
    "profile": ("lutnn.tools.profile:main", "MACs/FLOPs and size of a model and its LUT conversion"),
    "kmeans-bench": ("lutnn.tools.bench_kmeans:main", "time every k-means engine on a run's calibration rows"),
    "maddness": ("lutnn.tools.maddness_compare:main", "MADDness vs k-means encoders on digits activations"),
    "sweep": ("lutnn.tools.sweep:main", "per-layer sensitivity, progressive replacement, calibration convergence"),
    "table-key-cost": ("lutnn.tools.table_key_cost:main", "per-call cost of the table-cache checksum"),
    "study": ("lutnn.tools.study:main", "dense / MADDness / k-means / LUT-NN (+recon, int8) per model on the test split"),
    "tensorrt": ("lutnn.tools.trt:main", "torch-tensorrt latency of dense and LUT models (GPU; tensorrt_op.py)"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: lutnn <subcommand> [--help] [args...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"lutnn: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = SUBCOMMANDS[name][0].split(":")
    sys.argv[0] = f"lutnn {name}"  # argparse's prog
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
