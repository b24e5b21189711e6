#!/usr/bin/env python
"""Whole chain in one command: dense teacher -> k-means prototypes -> LUT retraining -> evaluation.

Stages whose outputs exist are skipped and training resumes from checkpoints/last.pt, so
re-running the same command after a crash continues the run. Works under torchrun.
"""
import sys

from lutnn.pipeline.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
