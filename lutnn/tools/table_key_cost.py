"""What the table-cache content checksum costs per eval call of a LUT layer.

    lutnn table-key-cost [--output docs/table_key_cost.md] [--repeats 200] [--threads N]

The table cache is keyed on each parameter's identity, version counter and an integer sum of its
bit patterns, so that ``layer.weight.data.mul_(2)`` (which moves no version counter) rebuilds the
table. This times ``layer(x)`` in eval with a cached table, with the checksum and with it stubbed
out, on DeiT-Tiny's layer shapes (V=8, K=16) for 1, 197 (one image) and 1576 (eight images) rows.
Runs in well under a minute; writes a Markdown table and a PNG next to it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..layers import LUTLinear
from ..layers import base as lut_base
from ..pipeline.cli import emit

SHAPES = {"attn.qkv 192->576": (192, 576), "mlp.fc1 192->768": (192, 768), "mlp.fc2 768->192": (768, 192)}
ROWS = (1, 197, 1576)


@contextmanager
def _no_checksum() -> Iterator[None]:
    real = lut_base._bit_checksum
    zero = torch.zeros((), dtype=torch.int64)
    lut_base._bit_checksum = lambda t: zero
    try:
        yield
    finally:
        lut_base._bit_checksum = real


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


@torch.no_grad()
def measure(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    out = []
    for name, (d, m) in SHAPES.items():
        layer = LUTLinear(d, m, subvec_len=8).eval()
        for n in ROWS:
            x = torch.randn(n, d)
            # interleave the two variants so that load on a shared machine hits both alike
            with_sum, without = [], []
            for _ in range(5):
                with_sum.append(_median_us(lambda: layer(x), repeats // 5))
                with _no_checksum():
                    without.append(_median_us(lambda: layer(x), repeats // 5))
            w, wo = statistics.median(with_sum), statistics.median(without)
            out.append({"layer": name, "rows": n, "with_us": w, "without_us": wo, "overhead_us": w - wo})
    return out


def to_markdown(rows: list[dict]) -> str:
    lines = [
        f"Eval forward of one LUTLinear (cached table), median µs over the runs; {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}.",
        "",
        "| layer | rows | with checksum µs | without µs | overhead µs | overhead % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['layer']} | {r['rows']} | {r['with_us']:.1f} | {r['without_us']:.1f} | {r['overhead_us']:.1f} | "
        f"{100 * r['overhead_us'] / r['without_us']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [f"{r['layer'].split()[0]}\n{r['rows']} rows" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["without_us"] for r in rows], 0.4, label="without checksum")
    ax.bar([x + 0.2 for x in xs], [r["with_us"] for r in rows], 0.4, label="with checksum")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(ylabel="µs per call (median)", yscale="log", title="LUTLinear eval call: table-key checksum cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", help="write the Markdown table here (and a PNG with the same stem)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per variant and shape")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 on a crowded machine")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    emit(to_markdown(rows), args.output)
    if args.output:
        print(plot(rows, Path(args.output).with_suffix(".png")))
    return 0
