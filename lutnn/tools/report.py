"""What every benchmark shares: its clocks, and how it leaves its result (Markdown printed and written, a chart beside it)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

# ``--clock``: wall time, or the calling thread's CPU time (robust on a loaded machine, 1 thread only)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def write_report(out: Path, stem: str, markdown: str, plot: Callable[[Path], None]) -> None:
    """Print ``markdown`` and write ``out/stem.md`` and ``out/stem.png`` (drawn by ``plot(path)``)."""
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    md.write_text(markdown + "\n")
    plot(png)
    print(markdown)
    print(f"\nwrote {md} and {png}")
