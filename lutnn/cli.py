"""Shared command-line plumbing of the root scripts: ``--config``, ``--set``, one-line errors."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lr=1e-3 --set distill.enabled=false")
    return p


def first_line(err: BaseException) -> str:
    """One line for a CLI error: the message's first line, or the exception type if it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def emit(text: str, output: str | None) -> None:
    """Print a report and, when ``output`` is given, also write it there (reports are Markdown)."""
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def run_stages(args: argparse.Namespace, stages: Sequence[str], resume: bool) -> int:
    """Run ``stages`` of the pipeline; known errors become one line on stderr and exit code 2."""
    from .config import ConfigError, load_config
    from .convert import LUTConfigError
    from .data import DataError
    from .io import PrototypeFileError
    from .pipeline import Pipeline, RunError
    from .train import shutdown_distributed

    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        pipe = Pipeline(cfg)
        pipe.run(stages, resume)
    except (ConfigError, DataError, LUTConfigError, PrototypeFileError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    pipe.log(f"wall time: {time.perf_counter() - start:.1f}s ({', '.join(stages)}) -> {pipe.paths.root}")
    return 0
