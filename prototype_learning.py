#!/usr/bin/env python
"""Calibrate and k-means-initialise the prototypes of every selected layer.

Trains (or loads, with teacher.checkpoint) the dense teacher if the run dir has none, then
captures input rows from init.num_batches training batches, runs k-means per codebook and
writes <output_dir>/prototypes.safetensors and init_report.{md,json}.
"""
import sys

from lutnn.pipeline.cli import prototypes_main

if __name__ == "__main__":
    sys.exit(prototypes_main())
