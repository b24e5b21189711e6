"""Tuning of LUT kernel tile sizes with a reusable JSON database.

The search space is the hand schedule's knobs (:func:`schedules.knob_space`: rows x
columns held in registers for read-accumulate, codebooks per step for encode) plus, for
int8 K=16 tables, the shuffle kernels the CPU supports. Each candidate is built and
timed in-process; the best knobs per workload (target CPU + kernel shape) go to
``<work_dir>/lutnn_tvm_tuning.json``, with the best time of every kernel kind tried
(``"kernels"``) and the best gather knobs (``"gather_knobs"``, for callers that need the
plain ``[C, K, M]`` table layout). A workload already in the file is never tuned again,
so a second call with the same shapes does no tuning.

Why not MetaSchedule here: the search space is not only loop tiles but the kernel kind and
the table layout it reads (gather vs the repacked shuffle tables), which a MetaSchedule trace
cannot express. MetaSchedule does tune the other functions of a compiled model, on request
(:mod:`.metaschedule`). The schedules here use the same ``s_tir.Schedule`` primitives and the
knob values are plain decisions.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import IRModule, tirx
from tvm.target import Target

from ..io import write_text_atomic
from ..progress import progress
from .kernels import EncodeSpec, KernelSpec, LookupSpec
from .schedules import FAMILIES, Knobs, default_knobs, knob_space, scheduled
from .shuffle import prepare_table

log = logging.getLogger(__name__)
TUNING_DIR_ENV = "LUTNN_TVM_CACHE"
DB_FILE = "lutnn_tvm_tuning.json"
CLOCK_ENV = "LUTNN_CLOCK"


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

    def knobs(self, spec: KernelSpec, target: Target, gather_only: bool = False) -> Knobs | None:
        """The tuned knobs; ``gather_only``: for a lookup, the best that read the plain ``[C, K, M]`` table."""
        rec = self.records.get(workload_key(spec, target))
        if not rec:
            return None
        if gather_only and isinstance(spec, LookupSpec) and rec["knobs"].get("kernel", "gather") != "gather":
            return Knobs(**rec["gather_knobs"]) if rec.get("gather_knobs") else None
        return Knobs(**rec["knobs"])

    def commit(self, spec: KernelSpec, target: Target, results: list[tuple[Knobs, float]], trials: int) -> None:
        """Record the fastest of ``results`` (knobs, ms) plus the best time per kernel kind."""
        knobs, ms = min(results, key=lambda r: r[1])
        kernels: dict[str, float] = {}
        for k, t in results:
            kernels[k.kernel] = min(t, kernels.get(k.kernel, t))
        gather = [r for r in results if r[0].kernel == "gather"]
        self.records[workload_key(spec, target)] = {
            "spec": {"kind": spec.kind, **asdict(spec)}, "knobs": asdict(knobs), "latency_ms": ms,
            "kernels": kernels, "trials": trials,
            "gather_knobs": asdict(min(gather, key=lambda r: r[1])[0]) if gather else None,
        }
        write_text_atomic(self.path, json.dumps(self.records, indent=1, sort_keys=True))


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


def timer():
    """Wall clock, or with ``LUTNN_CLOCK=thread`` the calling thread's CPU time: on a loaded
    shared machine that leaves out the time other processes hold the core. Only meaningful
    for single-threaded runs (work on other threads is not counted)."""
    return time.thread_time if os.environ.get(CLOCK_ENV) == "thread" else time.perf_counter


def kernel_clock(target: Target):
    """Thread CPU time for 1-thread targets (robust to other load), else :func:`timer`."""
    return time.thread_time if int(target.attrs.get("num-cores", 0)) == 1 else timer()


def time_kernel(fn, args: list, min_ms: float = 20.0, repeat: int = 5, clock=None) -> float:
    """Median milliseconds of ``fn(*args)`` (each repeat runs >= ``min_ms``), by ``clock``
    (default :func:`timer`)."""
    clock = clock or timer()
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


@dataclass(frozen=True)
class LookupKernel:
    """A compiled read-accumulate and the table layout it reads.

    Call it like the kernel (``codes, table, [scale,] bias, y``) with ``table`` converted
    once per layer by :meth:`prepare_table` (identity for gather kernels; the shuffle
    kernels read a repacked table, :func:`lutnn.tvm.shuffle.prepare_table`).
    """

    fn: Any
    spec: LookupSpec
    knobs: Knobs

    @property
    def kernel(self) -> str:
        return self.knobs.kernel

    def prepare_table(self, table) -> np.ndarray:
        return prepare_table(np.asarray(table), self.knobs.kernel)

    @property
    def table_shape(self) -> tuple[int, ...]:
        """Shape of the table argument this kernel reads."""
        c, k, m = self.spec.c, self.spec.k, self.spec.m
        return {"gather": (c, k, m), "vpermb512": (m, -(-c // 4), 4 * k)}.get(self.kernel, (m, c + c % 2, k))

    def __call__(self, *args):
        if tuple(args[1].shape) != self.table_shape:
            raise ValueError(f"{self.spec.name} ({self.kernel} kernel): table shape {tuple(args[1].shape)}, "
                             f"expected {self.table_shape}; pass kernel.prepare_table(table)")
        return self.fn(*args)


def kernel_args(kernel, spec: KernelSpec, seed: int = 0) -> list:
    """Random arguments for ``kernel`` (a compiled encode or a :class:`LookupKernel`) as TVM tensors."""
    args = random_inputs(spec, seed)
    if isinstance(kernel, LookupKernel):
        args[1] = kernel.prepare_table(args[1])
    dev = tvm.cpu()
    return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]


def tune_kernel(spec: KernelSpec, target: Target, trials: int, seed: int = 0) -> list[tuple[Knobs, float]]:
    """Time the default knobs, every shuffle kernel the CPU has, and other points of the knob
    space up to ``trials`` in all; returns (knobs, ms) per candidate."""
    space = knob_space(spec, target)
    first = default_knobs(spec, target)
    rest = [k for k in space if k != first]
    random.Random(seed).shuffle(rest)
    # one tile width per shuffle kernel always competes, so the choice gather vs shuffle is measured
    one_per_kernel: dict[str, Knobs] = {}
    for k in rest:
        if k.kernel != first.kernel:
            one_per_kernel.setdefault(k.kernel, k)
    must = list(one_per_kernel.values())
    others = [k for k in rest if k not in must]
    results = []
    for knobs in [first, *must, *others][:max(trials, len(must) + 1)]:
        fn = build_kernel(spec, target, knobs=knobs)
        ms = time_kernel(fn, kernel_args(fn, spec, seed), clock=kernel_clock(target))
        log.debug("%s %s: %.3f ms", spec.name, knobs, ms)
        results.append((knobs, ms))
    return results


def tune_kernels(specs: list[KernelSpec], target: Target, work_dir: str | Path | None, trials: int,
                 seed: int = 0) -> TuningDatabase:
    """Tune every spec the database lacks (none when ``trials <= 0``); returns the database."""
    db = TuningDatabase(work_dir)
    todo = [s for s in dict.fromkeys(specs) if db.knobs(s, target) is None]
    if trials > 0 and todo:
        for spec in progress(todo, desc=f"tuning {len(todo)} LUT kernels x {trials} trials"):
            db.commit(spec, target, tune_kernel(spec, target, trials, seed), trials)
    return db


def build_kernel(spec: KernelSpec, target: Target, db: TuningDatabase | None = None, knobs: Knobs | None = None):
    """Compile one kernel: ``knobs`` if given, else the tuned knobs if ``db`` has them, else
    the hand default. Encode: the runtime function; lookup: a :class:`LookupKernel`."""
    knobs = knobs or (db.knobs(spec, target) if db is not None else None) or default_knobs(spec, target)
    fn = compile_kernel(scheduled(spec, target, knobs), spec.name, target)
    return LookupKernel(fn, spec, knobs) if isinstance(spec, LookupSpec) else fn
