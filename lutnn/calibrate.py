"""Prototype initialisation from real activations (LUT-NN's k-means step).

1. :func:`capture_rows` runs calibration batches through a converted model with
   every LUT layer in ``"dense"`` mode (so activations are the dense model's) and
   keeps a bounded random sample of each layer's input rows.
2. :func:`init_prototypes` runs k-means per codebook on those rows and writes the
   centroids into the layers, reporting each layer's output reconstruction error.

:func:`init_prototypes_sequential` does both layer by layer in forward order: layer ``l``'s
prototypes are fitted on the inputs it sees when the layers before it already look up tables,
so each k-means absorbs the error of the converted layers upstream instead of compounding it.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import islice
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from .convert import lut_layers
from .faults import fault_point
from .kmeans import kmeans, resolve_backend
from .layers import LUTBase
from .layers import functional as LF
from .progress import progress


@contextmanager
def _modes(layers: Iterable[LUTBase], mode: str) -> Iterator[None]:
    layers = list(layers)
    saved = [layer.mode for layer in layers]
    try:
        for layer in layers:
            layer.set_mode(mode)
        yield
    finally:
        for layer, m in zip(layers, saved):
            layer.mode = m


def _batch_inputs(batch) -> Tensor:
    """Images from a ``(images, labels)`` batch or a bare tensor."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def capture_rows(
    model: nn.Module,
    batches: Iterable,
    max_rows: int = 16384,
    num_batches: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Input rows ``[N <= max_rows, D]`` of every LUT layer, sampled uniformly per batch.

    Memory stays bounded: each batch contributes at most ``ceil(max_rows / num_batches)``
    rows per layer (all rows when ``num_batches`` is unknown, then a final subsample).
    ``names`` restricts capture to those LUT layers; only they run dense, the others keep
    their mode (progressive replacement calibrates new layers behind already-replaced ones).
    """
    layers = lut_layers(model)
    if names is not None:
        wanted = list(names)
        unknown = sorted(set(wanted) - set(layers))
        if unknown:
            raise KeyError(f"not LUT layers of the model: {unknown}")
        layers = {n: layers[n] for n in wanted}
    if not layers:
        raise ValueError("model has no LUT layers; run lutnn.convert_ first")
    gen = torch.Generator().manual_seed(seed)
    per_batch = None if num_batches is None else -(-max_rows // num_batches)
    store: dict[str, list[Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        def fn(module: LUTBase, args) -> None:
            rows = module.rows(args[0]).detach()
            if per_batch is not None and rows.shape[0] > per_batch:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[:per_batch].to(rows.device)]
            store[name].append(rows.float().cpu())
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with _modes(layers.values(), "dense"):
            for i, batch in enumerate(progress(batches, desc="calibration", total=num_batches)):
                if num_batches is not None and i >= num_batches:
                    break
                x = _batch_inputs(batch)
                model(x.to(device) if device is not None else x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    out = {}
    for name, chunks in store.items():
        if not chunks:
            raise RuntimeError(f"layer {name!r} was never called during calibration")
        rows = torch.cat(chunks)
        if rows.shape[0] > max_rows:
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
        out[name] = rows
    return out


def reconstruction_error(layer: LUTBase, rows: Tensor) -> float:
    """Relative Frobenius error ``||X W^T - LUT(X)|| / ||X W^T||`` (bias excluded)."""
    w = layer.weight_2d().detach().float()
    p = layer.prototypes.detach().float()
    rows = rows.to(w.device).float()
    exact = rows @ w.T
    approx = LF.table_lookup(LF.encode(rows, p), LF.build_table(p, w))
    return float((exact - approx).norm() / exact.norm().clamp_min(1e-30))


@dataclass
class InitReport:
    name: str
    rows: int
    backend: str
    seconds: float
    error_random: float  # reconstruction error with random rows as prototypes (reference)
    error_kmeans: float


@torch.no_grad()
def init_prototypes(
    model: nn.Module,
    rows: dict[str, Tensor],
    backend: str = "auto",
    niter: int = 25,
    seed: int = 0,
) -> list[InitReport]:
    """k-means every LUT layer's codebooks on its captured ``rows`` and load the centroids.

    Rows move to each layer's device first (:func:`capture_rows` keeps them on the CPU), so the
    ``torch`` engine runs where the model is; ``faiss`` and ``kmcuda`` take host arrays either way.
    """
    import time

    layers = lut_layers(model)
    missing = sorted(set(layers) - set(rows))
    if missing:
        raise KeyError(f"no calibration rows for LUT layers {missing}")
    engine = resolve_backend(backend)
    gen = torch.Generator().manual_seed(seed)
    reports = []
    for name, layer in progress(layers.items(), desc=f"k-means ({engine})", total=len(layers)):
        x = rows[name]
        if x.shape[1] != layer.in_features:
            raise ValueError(f"layer {name!r}: calibration rows have D={x.shape[1]}, layer expects {layer.in_features}")
        # on the layer's device: the torch engine then clusters on the GPU a CUDA model sits on
        xs = LF.split_subvectors(x.to(layer.prototypes.device), layer.num_codebooks).contiguous()  # [C, N, V]
        # reference: K random input sub-vectors as prototypes
        pick = torch.randint(x.shape[0], (layer.num_prototypes,), generator=gen)
        layer.prototypes.copy_(xs[:, pick].to(layer.prototypes))
        err_random = reconstruction_error(layer, x)
        start = time.perf_counter()
        centroids = kmeans(xs, layer.num_prototypes, niter=niter, seed=seed, backend=engine)
        if centroids.is_cuda:
            torch.cuda.synchronize(centroids.device)  # CUDA work is asynchronous: time it finished
        seconds = time.perf_counter() - start
        layer.prototypes.copy_(centroids.to(layer.prototypes))
        reports.append(InitReport(name, x.shape[0], engine, seconds, err_random, reconstruction_error(layer, x)))
        fault_point("kmeans_layer")
    return reports


def init_report_markdown(reports: list[InitReport]) -> str:
    lines = [
        "| layer | rows | backend | k-means s | rel. error (random protos) | rel. error (k-means) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {r.rows} | {r.backend} | {r.seconds:.3f} | {r.error_random:.4f} | {r.error_kmeans:.4f} |"
        for r in reports
    ]
    return "\n".join(lines)


@torch.no_grad()
def init_prototypes_sequential(
    model: nn.Module,
    batches: Iterable,
    max_rows: int = 16384,
    num_batches: int | None = None,
    backend: str = "auto",
    niter: int = 25,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[InitReport]:
    """k-means every LUT layer, in ``lut_layers`` (module) order, on inputs produced by the layers before it
    already in table-lookup mode (the layers after it run dense).

    One calibration pass per layer over the same ``num_batches`` batches (kept in memory), so the cost is
    ``len(lut_layers(model))`` times :func:`capture_rows`. Module order must be forward order (true for
    sequential CNNs and transformer blocks), otherwise a layer is fitted on inputs of a not-yet-fitted one.
    """
    batches = list(islice(batches, num_batches))
    layers = lut_layers(model)
    if not layers:
        raise ValueError("model has no LUT layers; run lutnn.convert_ first")
    names = list(layers)
    reports: list[InitReport] = []
    for i, name in enumerate(names):
        with _modes([layers[n] for n in names[i + 1:]], "dense"):
            rows = capture_rows(model, batches, max_rows, len(batches), seed, device, names=[name])[name]
        reports += [replace(r, name=name) for r in init_prototypes(layers[name], {"": rows}, backend, niter, seed)]
    return reports
