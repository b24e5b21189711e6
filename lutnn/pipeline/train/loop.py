"""The training loop shared by dense-teacher training and LUT retraining.

One call to :func:`fit` trains ``cfg.epochs`` epochs, evaluates after each (LUT layers
in table-lookup mode), writes ``last`` and, on a new best validation top-1, ``best``
checkpoints, and logs tensorboard scalars. With ``resume=True`` it continues from
``last`` exactly: weights, optimiser, scheduler, AMP scaler, RNG states, the weight EMA,
the early-stopping state and the data order (a function of ``(seed, epoch)`` only) are
all restored.

Recipe knobs (:class:`OptimConfig`): ``ema_decay`` validates (and saves as ``ema``, which
:func:`lutnn.pipeline.models.load_state` prefers) an EMA of the weights; ``early_stop_patience``
ends training after that many epochs without a better validation top-1; ``recon_weight``
adds the per-layer reconstruction loss of :mod:`.recon`.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import DistillConfig, OptimConfig
from ...convert import lut_layers
from ...faults import fault_point
from ...io import write_text_atomic
from ..data import set_epoch
from ..evaluate import evaluate
from ...progress import progress
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distill import total_loss
from .distributed import DistEnv
from .ema import ModelEma
from .recon import ReconstructionLoss
from .schedule import build_optimizer, build_scheduler


@dataclass
class FitPaths:
    last: Path
    best: Path | None = None
    history: Path | None = None  # JSON list of per-epoch metrics, rewritten every epoch
    tensorboard: Path | None = None


@dataclass
class FitResult:
    epochs_done: int
    steps: int
    best_top1: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def epochs_since_best(history: list[dict[str, Any]]) -> int:
    """Epochs after the one with the highest validation top-1 (the first such epoch on ties)."""
    if not history:
        return 0
    top = [row["val_top1"] for row in history]
    return len(top) - 1 - top.index(max(top))


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss; the message says where and what can be resumed."""


def _finite_grads(model: nn.Module) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def _names(names: list[str]) -> str:
    return f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"


def _nonfinite_message(stage: str, loss: float, step: int, epoch: int, model: nn.Module,
                       last: Path, saved_epoch: int | None) -> str:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        where = f"non-finite parameters: {_names(bad)}"
    elif grads and math.isfinite(loss):
        where = f"all parameters finite; non-finite gradients: {_names(grads)}"
    else:
        where = "all parameters finite (the batch or the loss itself overflowed)"
    what = f"loss is {loss}" if not math.isfinite(loss) else "gradients are non-finite"
    good = f"{last} (epoch {saved_epoch})" if saved_epoch else "none (no epoch finished)"
    return (f"[{stage}] {what} at step {step} (epoch {epoch + 1}); {where}; last good checkpoint: {good}; "
            "set nonfinite: skip in this stage's config section to skip such steps")


def _autocast(device: torch.device, cfg: OptimConfig):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.amp_dtype))
    return nullcontext()


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    cfg: OptimConfig,
    paths: FitPaths,
    env: DistEnv,
    *,
    stage: str,
    seed: int,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
    log_every: int = 10,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` (already on ``env.device``); returns the per-epoch history."""
    device = env.device
    ddp_model = env.wrap(model)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16")
    use_kd = teacher is not None and distill is not None and distill.enabled and distill.weight > 0
    if teacher is not None:
        teacher.eval()

    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    recon = ReconstructionLoss(model) if cfg.recon_weight > 0 else None
    start_epoch, step, best, history, stopped = 0, 0, float("-inf"), [], False
    saved_epoch = None
    if resume and paths.last.is_file():
        ckpt = load_checkpoint(paths.last)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, step, best, history = ckpt["epoch"], ckpt["step"], ckpt["best_top1"], ckpt["history"]
        saved_epoch = start_epoch
        stopped = ckpt.get("stopped_early", False)

    writer = None
    if env.is_main and paths.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(paths.tensorboard), purge_step=step if step else None)

    layers = lut_layers(model)
    for epoch in range(start_epoch, cfg.epochs if not stopped else start_epoch):
        set_epoch(train_loader, epoch, seed)
        ddp_model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        skipped = 0
        bar = progress(train_loader, desc=f"{stage} {epoch + 1}/{cfg.epochs}", disable=not env.is_main)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, cfg):
                logits = ddp_model(x)
                t_logits = None
                if use_kd:
                    with torch.no_grad():
                        t_logits = teacher(x)
                loss = total_loss(logits, y, t_logits, distill.weight if use_kd else 0.0,
                                  distill.temperature if use_kd else 1.0, cfg.label_smoothing)
                if recon is not None:
                    loss = loss + cfg.recon_weight * recon.pop()
            optimizer.zero_grad(set_to_none=True)
            # backward on every rank (skipping it on one would hang DDP's all-reduce), then all decide together.
            # The fused STE's forward does not read tau: a non-finite tau shows only in the gradients, so they
            # are checked before the step spreads them (a GradScaler skips such steps itself).
            scaler.scale(loss).backward()
            finite = bool(torch.isfinite(loss)) and (scaler.is_enabled() or _finite_grads(model))
            nonfinite = env.all_reduce_sum(torch.tensor([float(not finite)], device=loss.device))
            if nonfinite.item():
                if cfg.nonfinite != "skip":
                    raise NonFiniteError(_nonfinite_message(stage, loss.item(), step + 1, epoch, model, paths.last,
                                                            saved_epoch))
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                step += 1
                scheduler.step()
                continue
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            fault_point(f"{stage}_step")
            n = y.numel()
            sums += torch.tensor([loss.item() * n, (logits.argmax(1) == y).sum().item(), n], dtype=torch.float64)
            if env.is_main and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if writer is not None and step % log_every == 0:
                writer.add_scalar(f"{stage}/loss", loss.item(), step)
                for group in optimizer.param_groups:
                    writer.add_scalar(f"{stage}/lr/{group['name']}", group["lr"], step)
                for name, layer in layers.items():
                    writer.add_scalar(f"{stage}/tau/{name}", layer.temperature.item(), step)
        sums = env.all_reduce_sum(sums.to(device) if device.type == "cuda" else sums).cpu()
        train_seconds = time.perf_counter() - t0  # loss.item() synchronised every step
        with ema.applied(model) if ema is not None else nullcontext():
            val = evaluate(model, eval_loader, device, env, desc=f"{stage} eval")
        row = {
            "epoch": epoch + 1, "step": step, "train_loss": sums[0].item() / max(sums[2].item(), 1),
            "train_top1": 100 * sums[1].item() / max(sums[2].item(), 1), "val_loss": val.loss, "val_top1": val.top1,
            "val_top5": val.top5, "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
            "steps": steps_per_epoch, "skipped_steps": skipped,
        }
        history.append(row)
        is_best = val.top1 > best
        best = max(best, val.top1)
        stopped = cfg.early_stop_patience is not None and epochs_since_best(history) >= cfg.early_stop_patience
        if writer is not None:
            for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
                writer.add_scalar(f"{stage}/epoch/{key}", row[key], step)
            writer.flush()
        if env.is_main:
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "epoch": epoch + 1, "step": step, "best_top1": best, "history": history, "stopped_early": stopped,
                **({"ema": ema.state_dict()} if ema is not None else {}), **(extra_state or {}),
            }
            save_checkpoint(paths.last, state, paths.best if is_best and paths.best else None)
            saved_epoch = epoch + 1
            if paths.history is not None:
                write_text_atomic(paths.history, json.dumps(history, indent=1) + "\n")
            print(f"[{stage}] epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                  f"train top-1 {row['train_top1']:.2f}% val top-1 {val.top1:.2f}% ({row['seconds']:.1f}s)",
                  flush=True)
            if stopped:
                print(f"[{stage}] early stop: no better val top-1 for {cfg.early_stop_patience} epochs", flush=True)
        env.barrier()
        if stopped:
            break
    if recon is not None:
        recon.remove()
    if writer is not None:
        writer.close()
    return FitResult(len(history), step, best, history, stopped)
