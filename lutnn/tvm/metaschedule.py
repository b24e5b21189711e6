"""MetaSchedule for the non-LUT functions of a compiled model, with a persistent database.

:func:`tune_functions` tunes the fused TIR functions that :func:`relax_model.compile_model`
would otherwise give to :func:`schedules.schedule_generic` (LayerNorm, softmax, attention
matmuls, the dense convs, ...) and keeps the records in a MetaSchedule JSON database under
``<tuning_dir>/metaschedule/<cpu>-<threads>t``. Functions tagged with ``KERNEL_ATTR`` (the LUT
kernels) are never handed to MetaSchedule: they keep their own knob tuner (:mod:`.tuning`).
Records are keyed by the function's structure, so models sharing a shape share its record,
and a function that already has a record is not tuned again.
"""
from __future__ import annotations

import logging
from pathlib import Path

import tvm
from tvm import IRModule, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .kernels import KERNEL_ATTR

log = logging.getLogger(__name__)
MS_DIR = "metaschedule"
# MetaSchedule's LocalBuilder starts a worker process per build that imports TVM (~5 s) and
# then compiles; with its default 30 s timeout every build was killed on the shared 2-core
# machine (a 2-trial tune_tir ran 297 s with 0 valid trials). One worker, so tuning does not
# fight itself for the cores; the runner times out separately.
BUILD_TIMEOUT_S = 180
RUN_TIMEOUT_S = 60


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
    returns the database."""
    db = open_database(work_dir)
    todo = {name: f for name, f in funcs.items() if db.query_tuning_record(workload(f), target, "main") is None}
    if trials <= 0 or not todo:
        return db
    log.info("MetaSchedule: tuning %d functions x %d trials into %s", len(todo), trials, work_dir)
    names = sorted(todo)
    tasks = [ms.TuneContext(mod=workload(todo[name]), target=target, space_generator="post-order-apply",
                            search_strategy="evolutionary", task_name=name, rand_state=rand, num_threads=1,
                            logger=logger).clone()
             for name, logger, rand in zip(names, ms.logging.get_loggers_from_work_dir(str(work_dir), names),
                                           ms.utils.fork_seed(seed, n=len(names)))]
    return ms.tune_tasks(
        tasks=tasks, task_weights=[1.0] * len(tasks), work_dir=str(work_dir),
        max_trials_global=trials * len(tasks), max_trials_per_task=trials, num_trials_per_iter=min(trials, 64),
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S),
        runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S), database=db)
