#!/usr/bin/env python
"""Whole chain in one command: dense teacher -> k-means prototypes -> LUT retraining -> evaluation.

Stages whose outputs exist are skipped and training resumes from checkpoints/last.pt, so
re-running the same command after a crash continues the run. Works under torchrun.
"""
import sys

from lutnn.cli import parser, run_stages
from lutnn.pipeline import STAGES

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = p.parse_args()
    sys.exit(run_stages(args, [s.strip() for s in args.stages.split(",") if s.strip()], resume=True))
