"""Time every k-means engine on the same captured activations and compare their error.

    lutnn kmeans-bench --config configs/default.yaml [--teacher runs/default/teacher.pt]

Rows are captured once (the config's ``init`` section: batches, row cap) from the
config's model — with ``--teacher`` weights when given, else the run dir's teacher if it
exists, else random weights — then each engine clusters every layer's codebooks. The
table gives per-layer seconds and relative output reconstruction error per engine; the
``auto`` order in :mod:`lutnn.kmeans` comes from this benchmark.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from ..calibrate import InitReport, init_prototypes
from ..pipeline.cli import emit
from ..pipeline.cli import parser as config_parser
from ..kmeans import available_backends


def benchmark(config: str, overrides: list[str], teacher: str | None, backends: list[str]) -> str:
    from ..pipeline.resolve import load_config
    from ..pipeline.runner import Pipeline
    from ..pipeline.runs import build_lut, build_teacher

    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    pipe = Pipeline(cfg)
    weights = Path(teacher) if teacher else pipe.paths.teacher
    dense = build_teacher(cfg, pipe.splits.num_classes, weights if weights.is_file() else None)
    model = build_lut(cfg, dense.to(pipe.env.device).eval())
    rows = pipe.calibration_rows(model)
    results: dict[str, list[InitReport]] = {
        b: init_prototypes(model, rows, b, cfg.init.niter, cfg.seed) for b in backends
    }
    layers = {name: layer for name, layer in model.named_modules() if name in rows}
    head = "| layer | rows | C | V | " + " | ".join(f"{b} s | {b} error" for b in backends) + " |"
    lines = [
        f"Model {cfg.model.name} {cfg.model.kwargs}, weights: {weights if weights.is_file() else 'random'}; "
        f"K={next(iter(layers.values())).num_prototypes}, niter={cfg.init.niter}, "
        f"{torch.get_num_threads()} threads. Error: relative Frobenius error of the layer output "
        "(random-row prototypes in brackets).",
        "",
        head,
        "|---|---:|---:|---:|" + "---:|---:|" * len(backends),
    ]
    for i, name in enumerate(rows):
        layer = layers[name]
        cells = " | ".join(
            f"{results[b][i].seconds:.3f} | {results[b][i].error_kmeans:.4f}" for b in backends
        )
        lines.append(f"| {name} | {rows[name].shape[0]} | {layer.num_codebooks} | {layer.subvec_len} | {cells} |")
    total = " | ".join(
        f"**{sum(r.seconds for r in results[b]):.2f}** | "
        f"{statistics.mean(r.error_kmeans for r in results[b]):.4f} "
        f"({statistics.mean(r.error_random for r in results[b]):.4f})"
        for b in backends
    )
    lines.append(f"| **total / mean** | | | | {total} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p: argparse.ArgumentParser = config_parser(__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="dense weights to capture activations from (default: the run dir's)")
    p.add_argument("--backends", nargs="+", default=available_backends(), choices=["torch", "faiss", "kmcuda"])
    p.add_argument("--output", help="also write the Markdown table here")
    args = p.parse_args(argv)
    from ..pipeline.config import ConfigError

    try:
        text = benchmark(args.config, args.overrides, args.teacher, args.backends)
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
