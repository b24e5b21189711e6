"""MetaSchedule for the non-LUT functions of a compiled model, with a persistent database.

:func:`tune_functions` tunes the fused TIR functions that :func:`relax_model.compile_model`
would otherwise give to :func:`schedules.schedule_generic` (LayerNorm, softmax, attention
matmuls, the dense convs, ...) and keeps the records in a MetaSchedule JSON database under
``<tuning_dir>/metaschedule/<cpu>-<threads>t``. Functions tagged with ``KERNEL_ATTR`` (the LUT
kernels) are never handed to MetaSchedule: they keep their own knob tuner (:mod:`.tuning`).
Records are keyed by the function's structure, so models sharing a shape share its record,
and a function that already has a record is not tuned again. A record is used only where it
beats the hand schedule (:func:`beats_hand`: both timed in process, the verdict kept next to
the database), so a small search budget never makes a model slower.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import IRModule, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..io import write_text_atomic
from .kernels import KERNEL_ATTR
from .tuning import compile_kernel, kernel_clock, time_kernel

log = logging.getLogger(__name__)
MS_DIR = "metaschedule"
# MetaSchedule's LocalBuilder starts a worker process per build that imports TVM (~5 s) and
# then compiles; with its default 30 s timeout every build was killed on the shared 2-core
# machine (a 2-trial tune_tir ran 297 s with 0 valid trials). One worker, so tuning does not
# fight itself for the cores; the runner times out separately.
BUILD_TIMEOUT_S = 180
RUN_TIMEOUT_S = 60
VERDICTS_FILE = "hand_vs_metaschedule.json"


def database_dir(tuning_dir: str | Path, target: Target) -> Path:
    """``<tuning_dir>/metaschedule/<cpu>-<threads>t``: schedules depend on the CPU and thread count."""
    return Path(tuning_dir) / MS_DIR / f"{target.attrs.get('mcpu', 'generic')}-{int(target.attrs.get('num-cores', 1))}t"


def open_database(work_dir: str | Path) -> ms.database.JSONDatabase:
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(work_dir))


def tunable(mod: IRModule) -> dict[str, tirx.PrimFunc]:
    """The module's TIR functions MetaSchedule may schedule: all but the LUT kernels."""
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and (f.attrs is None or KERNEL_ATTR not in f.attrs)}


def workload(func: tirx.PrimFunc) -> IRModule:
    """The one-function module a record is keyed by (what ``TuneContext`` makes of a PrimFunc).

    A deep copy: a ``Schedule`` (replaying a record, tuning) rewrites the loops of the module it
    is given in place, which changed the caller's function, so its next lookup missed."""
    func = tvm.ir.load_json(tvm.ir.save_json(func))
    return IRModule({"main": func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)})


def lookup(db: ms.database.Database, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """``func`` with the database's best schedule, its attributes kept; None without a record."""
    sch = db.query_schedule(workload(func), target, "main")
    if sch is None:
        return None
    scheduled = sch.mod["main"].without_attr("global_symbol")
    for key, value in (func.attrs or {}).items():
        scheduled = scheduled.with_attr(key, value)
    return scheduled


def tune_functions(funcs: dict[str, tirx.PrimFunc], target: Target, work_dir: str | Path, trials: int,
                   seed: int = 0) -> ms.database.Database:
    """Tune with up to ``trials`` trials each the functions without a record (none if ``trials <= 0``);
    returns the database. Task logs go to this module's logger: MetaSchedule's own file loggers
    (``get_loggers_from_work_dir``) crash on an unnamed handler of its global logger."""
    db = open_database(work_dir)
    todo = {name: f for name, f in funcs.items() if db.query_tuning_record(workload(f), target, "main") is None}
    if trials <= 0 or not todo:
        return db
    log.info("MetaSchedule: tuning %d functions x %d trials into %s", len(todo), trials, work_dir)
    names = sorted(todo)
    tasks = [ms.TuneContext(mod=workload(todo[name]), target=target, space_generator="post-order-apply",
                            search_strategy="evolutionary", task_name=name, rand_state=rand, num_threads=1,
                            logger=log.getChild(name)).clone()
             for name, rand in zip(names, ms.utils.fork_seed(seed, n=len(names)))]
    return ms.tune_tasks(
        tasks=tasks, task_weights=[1.0] * len(tasks), work_dir=str(work_dir),
        max_trials_global=trials * len(tasks), max_trials_per_task=trials, num_trials_per_iter=min(trials, 64),
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S),
        runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S), database=db)


def random_args(func: tirx.PrimFunc, seed: int = 0) -> list[tvm.runtime.Tensor]:
    """Arguments to time ``func``: normal floats, zero integers (indices that are always valid)."""
    rng = np.random.default_rng(seed)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = tuple(int(d) for d in info.shape), str(info.dtype)
        data = (rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") else np.zeros(shape, dtype))
        args.append(tvm.runtime.tensor(data))
    return args


def beats_hand(work_dir: str | Path, func: tirx.PrimFunc, tuned: tirx.PrimFunc, hand: tirx.PrimFunc,
               target: Target) -> bool:
    """Whether the record's schedule ``tuned`` runs faster than the hand schedule ``hand``.

    Both are built and timed in this process on the same arguments (a record's own time comes
    from a worker process and another clock, so it is not compared). The verdict is cached in
    ``<work_dir>/hand_vs_metaschedule.json`` by the function's structural hash plus the record's,
    so later compiles do not time again, and a newer record is judged afresh."""
    path = Path(work_dir) / VERDICTS_FILE
    verdicts = json.loads(path.read_text()) if path.exists() else {}
    key = f"{tvm_ffi.structural_hash(func)}/{tvm_ffi.structural_hash(tuned)}"
    if key not in verdicts:
        args = random_args(hand)
        clock = kernel_clock(target)
        times = {name: time_kernel(compile_kernel(f, "main", target), args, min_ms=5.0, repeat=3, clock=clock)
                 for name, f in (("metaschedule_ms", tuned), ("hand_ms", hand))}
        verdicts[key] = {**times, "name": str(func.attrs.get("global_symbol", "")) if func.attrs else ""}
        write_text_atomic(path, json.dumps(verdicts, indent=1, sort_keys=True))
    return verdicts[key]["metaschedule_ms"] < verdicts[key]["hand_ms"]
