"""Top-1/top-5 accuracy (sharded over DDP ranks), results tables and training-curve plots."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..faults import fault_point
from ..io import write_text_atomic
from ..progress import progress

if TYPE_CHECKING:
    from .train.distributed import DistEnv


@dataclass
class Accuracy:
    top1: float
    top5: float
    loss: float
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, env: DistEnv | None = None,
             desc: str = "eval") -> Accuracy:
    """Accuracy in the model's eval mode: for LUT layers in ``auto`` mode that is hard codes + tables."""
    if env is None:
        from .train.distributed import DistEnv

        env = DistEnv(device=device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for x, y in progress(loader, desc=desc):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == y.unsqueeze(1)
        sums += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(),
                              F.cross_entropy(logits, y, reduction="sum").item(), y.numel()], dtype=torch.float64)
    model.train(was_training)
    sums = env.all_reduce_sum(sums.to(env.device if env.device.type == "cuda" else "cpu")).cpu()
    n = max(1.0, sums[3].item())
    return Accuracy(100 * sums[0].item() / n, 100 * sums[1].item() / n, sums[2].item() / n, int(sums[3].item()))


RESULT_ROWS = {
    "teacher": "dense teacher",
    "kmeans_init": "LUT, k-means init (no retraining)",
    "retrained": "LUT, retrained",
}


def results_markdown(results: Mapping[str, Accuracy], meta: Mapping[str, object]) -> str:
    lines = ["| model | top-1 (%) | top-5 (%) | eval loss |", "|---|---:|---:|---:|"]
    for key, label in RESULT_ROWS.items():
        if key in results:
            r = results[key]
            lines.append(f"| {label} | {r.top1:.2f} | {r.top5:.2f} | {r.loss:.4f} |")
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: Mapping[str, Accuracy], meta: Mapping[str, object]) -> tuple[Path, Path]:
    js, md = run_dir / "results.json", run_dir / "results.md"
    # results.md first: results.json's presence (newer than best.pt) marks the eval stage done
    write_text_atomic(md, results_markdown(results, meta))
    fault_point("results_tmp")
    stored = {**{k: asdict(v) for k, v in results.items()}, "meta": dict(meta)}
    write_text_atomic(js, json.dumps(stored, indent=2) + "\n")
    return js, md


def plot_history(histories: Mapping[str, list[dict]], path: Path,
                 start_top1: Mapping[str, float] | None = None) -> Path | None:
    """Loss and validation top-1 per epoch for each stage as a PNG.

    ``start_top1`` adds an epoch-0 accuracy per stage (e.g. the k-means-init LUT model).
    """
    if not any(histories.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (stage, rows) in enumerate(histories.items()):
        if not rows:
            continue
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, marker=".", label=f"{stage} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], color=color, linestyle="--", marker=".",
                     label=f"{stage} val (CE)")
        acc = [r["val_top1"] for r in rows]
        if start_top1 and stage in start_top1:
            epochs, acc = [0, *epochs], [start_top1[stage], *acc]
        ax_acc.plot(epochs, acc, color=color, marker=".", label=f"{stage} val top-1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (train includes the distillation term)")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy (LUT: table-lookup inference)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
