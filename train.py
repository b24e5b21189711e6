#!/usr/bin/env python
"""Convert the teacher, load the k-means prototypes and retrain the LUT model end to end, then evaluate.

Writes checkpoints/{last,best}.pt every epoch, tensorboard scalars under tb/ and
results.{json,md}. --resume continues an interrupted run exactly. Multi-GPU:
torchrun --nproc_per_node=N train.py --config X
"""
import sys

from lutnn.pipeline.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
