"""Command lines of the pipeline stages (``lutnn run|prototypes|train``, the root scripts) and shared plumbing:
``--config``, ``--set``, one-line errors."""
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
    from .config import ConfigError
    from .resolve import load_config
    from ..convert import LUTConfigError
    from .data import DataError
    from ..io import PrototypeFileError
    from .runner import Pipeline, RunError
    from .train import shutdown_distributed
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteError

    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        pipe = Pipeline(cfg)
        pipe.run(stages, resume)
    except (CheckpointError, ConfigError, DataError, LUTConfigError, NonFiniteError, PrototypeFileError,
            RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    pipe.log(f"wall time: {time.perf_counter() - start:.1f}s ({', '.join(stages)}) -> {pipe.paths.root}")
    return 0


RUN_HELP = ("Whole chain in one command: dense teacher -> k-means prototypes -> LUT retraining -> evaluation. "
            "Stages whose outputs exist are skipped and training resumes from checkpoints/last.pt, so re-running "
            "the same command after a crash continues the run. Works under torchrun.")
PROTOTYPES_HELP = ("Calibrate and k-means-initialise the prototypes of every selected layer: trains (or loads, with "
                   "teacher.checkpoint) the dense teacher if the run dir has none, captures input rows from "
                   "init.num_batches training batches, runs k-means per codebook and writes "
                   "<output_dir>/prototypes.safetensors and init_report.{md,json}.")
TRAIN_HELP = ("Convert the teacher, load the k-means prototypes and retrain the LUT model end to end, then evaluate. "
              "Writes checkpoints/{last,best}.pt every epoch, tensorboard scalars under tb/ and results.{json,md}. "
              "--resume continues an interrupted run exactly. Multi-GPU: torchrun --nproc_per_node=N train.py "
              "--config X")


def run_main(argv: Sequence[str] | None = None) -> int:
    from .runner import STAGES

    p = parser(RUN_HELP)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = p.parse_args(argv)
    return run_stages(args, [s.strip() for s in args.stages.split(",") if s.strip()], resume=True)


def prototypes_main(argv: Sequence[str] | None = None) -> int:
    return run_stages(parser(PROTOTYPES_HELP).parse_args(argv), ["teacher", "prototypes"], resume=True)


def train_main(argv: Sequence[str] | None = None) -> int:
    p = parser(TRAIN_HELP)
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    args = p.parse_args(argv)
    return run_stages(args, ["train"] if args.no_eval else ["train", "eval"], resume=args.resume)
