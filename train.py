#!/usr/bin/env python
"""Convert the teacher, load the k-means prototypes and retrain the LUT model end to end, then evaluate.

Writes checkpoints/{last,best}.pt every epoch, tensorboard scalars under tb/ and
results.{json,md}. --resume continues an interrupted run exactly. Multi-GPU:
torchrun --nproc_per_node=N train.py --config X
"""
import sys

from lutnn.cli import parser, run_stages

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    args = p.parse_args()
    sys.exit(run_stages(args, ["train"] if args.no_eval else ["train", "eval"], resume=args.resume))
