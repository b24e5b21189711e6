"""How every benchmark leaves its result: the Markdown printed and written, and a chart beside it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def write_report(out: Path, stem: str, markdown: str, plot: Callable[[Path], None]) -> None:
    """Print ``markdown`` and write ``out/stem.md`` and ``out/stem.png`` (drawn by ``plot(path)``)."""
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    md.write_text(markdown + "\n")
    plot(png)
    print(markdown)
    print(f"\nwrote {md} and {png}")
