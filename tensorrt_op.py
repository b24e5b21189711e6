#!/usr/bin/env python
"""Compile a dense model and its LUT conversion with TensorRT and time them against eager.

    python tensorrt_op.py --model deit_tiny_patch16_224              # random weights, no run needed
    python tensorrt_op.py --checkpoint runs/deit_digits --precision fp16

Needs a CUDA GPU and torch-tensorrt; without them it exits with a one-line message.
Logic lives in ``lutnn.trt``.
"""
import sys

from lutnn.tools.trt import main

if __name__ == "__main__":
    sys.exit(main())
