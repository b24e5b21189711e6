"""Compile a retrained LUT model with TVM and compare it with PyTorch and TVM dense.

    python demo.py --checkpoint runs/default [--tune-trials 8] [--batch-size 64] [--threads 2]
"""
from lutnn.tools.demo import main

if __name__ == "__main__":
    main()
