"""Training machinery: the loop, distillation loss, schedules, checkpoints and DDP helpers."""
from .checkpoint import load_checkpoint, save_checkpoint, seed_everything
from .distill import kd_loss, total_loss
from .distributed import DistEnv, init_distributed, shutdown_distributed, unwrap
from .loop import FitPaths, FitResult, fit
from .schedule import WarmupCosine, build_optimizer, build_scheduler, param_groups

__all__ = [
    "DistEnv", "FitPaths", "FitResult", "WarmupCosine", "build_optimizer", "build_scheduler", "fit",
    "init_distributed", "kd_loss", "load_checkpoint", "param_groups", "save_checkpoint", "seed_everything",
    "shutdown_distributed", "total_loss", "unwrap",
]
