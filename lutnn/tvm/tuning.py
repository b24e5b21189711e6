"""Tuning of LUT kernel tile sizes with a reusable JSON database.

The search space is the hand schedule's knobs (:func:`schedules.knob_space`: rows x
columns held in registers for read-accumulate, codebooks per step for encode). Each
candidate is built and timed in-process; the best knobs per workload (target CPU +
kernel shape) go to ``<work_dir>/lutnn_tvm_tuning.json``. A workload already in the file
is never tuned again, so a second call with the same shapes does no tuning.

Why not ``meta_schedule.tune_tir``: in the installed apache-tvm 0.27.0.post1 serialising
any TIR node (``tvm.ir.save_json``, used by MetaSchedule's JSON database and by its
builder to ship modules to worker processes) segfaults, so its tuning loop crashes
before the first trial. The schedules here are still expressed with the same
``s_tir.Schedule`` primitives and the knob values are plain decisions.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tvm
from tvm import IRModule, tirx
from tvm.target import Target

from ..progress import progress
from .kernels import EncodeSpec, KernelSpec
from .schedules import FAMILIES, Knobs, default_knobs, knob_space, scheduled

log = logging.getLogger(__name__)
TUNING_DIR_ENV = "LUTNN_TVM_CACHE"
DB_FILE = "lutnn_tvm_tuning.json"


def default_tuning_dir() -> Path:
    """``$LUTNN_TVM_CACHE`` or ``~/.cache/lutnn/tvm``."""
    return Path(os.environ.get(TUNING_DIR_ENV, "~/.cache/lutnn/tvm")).expanduser()


def workload_key(spec: KernelSpec, target: Target) -> str:
    """CPU model, thread count and kernel shape: the best tiles depend on all three."""
    return f"{target.attrs.get('mcpu', 'generic')}-{int(target.attrs.get('num-cores', 1))}t/{spec.name}"


class TuningDatabase:
    """Best knobs per workload, persisted as one JSON file."""

    def __init__(self, work_dir: str | Path | None = None) -> None:
        self.path = Path(work_dir or default_tuning_dir()) / DB_FILE
        self.records: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: not a lutnn tuning database ({e})") from None

    def knobs(self, spec: KernelSpec, target: Target) -> Knobs | None:
        rec = self.records.get(workload_key(spec, target))
        return Knobs(**rec["knobs"]) if rec else None

    def commit(self, spec: KernelSpec, target: Target, knobs: Knobs, latency_ms: float, trials: int) -> None:
        self.records[workload_key(spec, target)] = {
            "spec": {"kind": spec.kind, **asdict(spec)}, "knobs": asdict(knobs),
            "latency_ms": latency_ms, "trials": trials,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1, sort_keys=True))
        tmp.replace(self.path)


def random_inputs(spec: KernelSpec, seed: int = 0) -> list[np.ndarray]:
    """Valid random arguments (outputs last) for timing or testing a kernel."""
    if type(spec) in FAMILIES:
        return FAMILIES[type(spec)].random_inputs(spec, seed)
    rng = np.random.default_rng(seed)
    if isinstance(spec, EncodeSpec):
        return [rng.standard_normal((spec.n, spec.c * spec.v), dtype=np.float32),
                rng.standard_normal((spec.c, spec.v, spec.k), dtype=np.float32),
                rng.standard_normal((spec.c, spec.k), dtype=np.float32),
                np.zeros((spec.n, spec.c), np.uint8)]
    codes = rng.integers(0, spec.k, (spec.n, spec.c)).astype(np.uint8)
    y = np.zeros((spec.n, spec.m), np.float32)
    bias = rng.standard_normal(spec.m, dtype=np.float32)
    if spec.table_dtype == "float32":
        return [codes, rng.standard_normal((spec.c, spec.k, spec.m), dtype=np.float32), bias, y]
    table = rng.integers(-127, 128, (spec.c, spec.k, spec.m)).astype(np.int8)
    return [codes, table, np.abs(rng.standard_normal(spec.m, dtype=np.float32)) / 127, bias, y]


def compile_kernel(func: tirx.PrimFunc, name: str, target: Target):
    """Build one scheduled PrimFunc; returns the callable runtime function."""
    return tvm.compile(IRModule({name: func.with_attr("global_symbol", name)}), target=target)[name]


def time_kernel(fn, args: list, min_ms: float = 20.0, repeat: int = 5, clock=time.perf_counter) -> float:
    """Median milliseconds of ``fn(*args)`` (each repeat runs >= ``min_ms``).

    ``clock=time.thread_time`` measures the calling thread's CPU time: for single-threaded
    runs it ignores the time other processes hold the core (shared machines)."""
    fn(*args)
    start = clock()
    fn(*args)
    once = max(clock() - start, 1e-6)
    number = max(1, int(min_ms / 1e3 / once))
    samples = []
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            fn(*args)
        samples.append((clock() - start) / number * 1e3)
    return float(np.median(samples))


def kernel_clock(target: Target):
    """Thread CPU time for 1-thread targets (robust to other load), wall time otherwise."""
    return time.thread_time if int(target.attrs.get("num-cores", 0)) == 1 else time.perf_counter


def tune_kernel(spec: KernelSpec, target: Target, trials: int, seed: int = 0) -> tuple[Knobs, float]:
    """Time the default knobs plus up to ``trials - 1`` other points of the knob space."""
    space = knob_space(spec, target)
    first = default_knobs(spec, target)
    rest = [k for k in space if k != first]
    random.Random(seed).shuffle(rest)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in random_inputs(spec, seed)]
    best: tuple[Knobs, float] | None = None
    for knobs in [first, *rest][:max(trials, 1)]:
        ms = time_kernel(compile_kernel(scheduled(spec, target, knobs), spec.name, target), args,
                         clock=kernel_clock(target))
        log.debug("%s %s: %.3f ms", spec.name, knobs, ms)
        if best is None or ms < best[1]:
            best = (knobs, ms)
    return best


def tune_kernels(specs: list[KernelSpec], target: Target, work_dir: str | Path | None, trials: int,
                 seed: int = 0) -> TuningDatabase:
    """Tune every spec the database lacks (none when ``trials <= 0``); returns the database."""
    db = TuningDatabase(work_dir)
    todo = [s for s in dict.fromkeys(specs) if db.knobs(s, target) is None]
    if trials > 0 and todo:
        for spec in progress(todo, desc=f"tuning {len(todo)} LUT kernels x {trials} trials"):
            knobs, ms = tune_kernel(spec, target, trials, seed)
            db.commit(spec, target, knobs, ms, trials)
    return db


def build_kernel(spec: KernelSpec, target: Target, db: TuningDatabase | None = None):
    """Compile one kernel with its tuned knobs if ``db`` has them, else the hand schedule."""
    knobs = db.knobs(spec, target) if db is not None else None
    return compile_kernel(scheduled(spec, target, knobs), spec.name, target)
