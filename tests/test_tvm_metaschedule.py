"""MetaSchedule for the non-LUT functions of compile_model: database records are applied only on
request, LUT kernels are never handed to MetaSchedule, and MetaSchedule-compiled models equal PyTorch.

The fast tests write records without measuring (a MetaSchedule search in a fresh process spends
minutes on this loaded machine before its first trial, see docs/speed.md); real tuning is in the
slow tests."""
import json

import pytest
import torch
import tvm
from torch import nn
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

import lutnn
from lutnn.tvm import metaschedule
from lutnn.tvm.kernels import KERNEL_ATTR
from lutnn.tvm.relax_model import compile_model, fused_functions, import_model
from lutnn.tvm.schedules import schedule_generic
from lutnn.tvm.target import host_target

TARGET = host_target(1)


@pytest.fixture(scope="module")
def model():
    """Two int8 LUT layers around LayerNorm + GELU, softmax head: a few small non-LUT functions."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10), nn.Softmax(-1))
    lut, _ = lutnn.convert(mlp, lutnn.LUTConfig(subvec_len=8))
    lutnn.quantize_tables_(lut, "output")
    return lut.eval(), torch.randn(6, 32)


def _record_schedule(db: ms.database.Database, func: tvm.tirx.PrimFunc) -> None:
    """Commit a record (no build, no timing) whose trace runs the outer loop of the function's
    first block across threads, as a MetaSchedule trace would."""
    sch = Schedule(metaschedule.workload(func))
    loops = sch.get_loops(sch.get_child_blocks(sch.get_sblock("root"))[0])
    sch.parallel(loops[0])
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(metaschedule.workload(func)), [1e-3], TARGET,
        ms.arg_info.ArgInfo.from_prim_func(func)))


@pytest.fixture(scope="module")
def tuning_dir(model, tmp_path_factory):
    """A tuning dir whose MetaSchedule database has a record for every non-LUT function of ``model``."""
    lut, x = model
    root = tmp_path_factory.mktemp("tuning")
    db = metaschedule.open_database(metaschedule.database_dir(root, TARGET))
    funcs = fused_functions(lut, x, TARGET)
    for func in funcs.values():
        _record_schedule(db, func)
    return root, sorted(funcs)


def test_tunable_skips_lut_kernels(model):
    lut, x = model
    mod, specs = import_model(lut, x, TARGET)
    kernels = {gv.name_hint for gv, f in mod.functions_items() if f.attrs is not None and KERNEL_ATTR in f.attrs}
    assert kernels == {s.name for s in specs} and len(kernels) == 4  # encode + lookup of 2 shapes
    assert not kernels & set(metaschedule.tunable(mod))
    assert not kernels & set(fused_functions(lut, x, TARGET))


def test_records_applied_and_model_matches_pytorch(model, tuning_dir, monkeypatch):
    lut, x = model
    root, names = tuning_dir
    monkeypatch.setattr(metaschedule, "beats_hand", lambda *args: True)
    for trials in (0, 1):  # every function has a record: nothing to tune either way
        compiled = compile_model(lut, x, TARGET, ms_trials=trials, tuning_dir=root)
        assert sorted(compiled.ms_scheduled) == names
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lut(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("record_ms, applied", [(1.0, True), (3.0, False)])
def test_record_used_only_where_it_beats_the_hand_schedule(model, tuning_dir, tmp_path, monkeypatch,
                                                           record_ms, applied):
    """Each function's record and hand schedule are timed once (record first); only a faster record
    is compiled in, and the verdicts are cached: a second compile times nothing."""
    lut, x = model
    root, names = tuning_dir
    work = tmp_path / "tuning"
    db_dir = metaschedule.database_dir(work, TARGET)
    db_dir.parent.mkdir(parents=True)
    import shutil
    shutil.copytree(metaschedule.database_dir(root, TARGET), db_dir)
    times = iter([record_ms, 2.0] * len(names))
    monkeypatch.setattr(metaschedule, "time_kernel", lambda *a, **k: next(times))
    compiled = compile_model(lut, x, TARGET, ms_trials=0, tuning_dir=work)
    assert sorted(compiled.ms_scheduled) == (names if applied else [])
    verdicts = json.loads((db_dir / metaschedule.VERDICTS_FILE).read_text())
    assert len(verdicts) == len(names)
    assert {(v["metaschedule_ms"], v["hand_ms"]) for v in verdicts.values()} == {(record_ms, 2.0)}

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again despite a cached verdict")

    monkeypatch.setattr(metaschedule, "time_kernel", no_timing)
    again = compile_model(lut, x, TARGET, ms_trials=0, tuning_dir=work)
    assert sorted(again.ms_scheduled) == sorted(compiled.ms_scheduled)
    with torch.no_grad():
        torch.testing.assert_close(again(x), lut(x), rtol=1e-5, atol=1e-5)


def test_beats_hand_times_both_for_real(model, tmp_path):
    lut, x = model
    name, func = sorted(fused_functions(lut, x, TARGET).items())[0]
    hand = schedule_generic(func, TARGET)
    verdict = metaschedule.beats_hand(tmp_path, func, func, hand, TARGET)  # the unscheduled function as a "record"
    (entry,) = json.loads((tmp_path / metaschedule.VERDICTS_FILE).read_text()).values()
    assert entry["metaschedule_ms"] > 0 and entry["hand_ms"] > 0
    assert verdict == (entry["metaschedule_ms"] < entry["hand_ms"])


def test_default_reads_no_database(model, tuning_dir):
    lut, x = model
    compiled = compile_model(lut, x, TARGET, tuning_dir=tuning_dir[0])
    assert compiled.ms_scheduled == []
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lut(x), rtol=1e-5, atol=1e-5)


def test_lookup_keeps_attributes_and_misses_without_record(model, tuning_dir, tmp_path):
    lut, x = model
    name, func = sorted(fused_functions(lut, x, TARGET).items())[0]
    db = metaschedule.open_database(metaschedule.database_dir(tuning_dir[0], TARGET))
    tuned = metaschedule.lookup(db, func, TARGET)
    assert "global_symbol" not in tuned.attrs and dict(tuned.attrs).items() >= dict(func.attrs or {}).items()
    assert metaschedule.lookup(metaschedule.open_database(tmp_path), func, TARGET) is None


def test_negative_trials_rejected(model):
    with pytest.raises(ValueError, match="ms_trials must be None or >= 0, got -1"):
        compile_model(*model, TARGET, ms_trials=-1)


@pytest.mark.slow
def test_metaschedule_compiled_model_matches_pytorch(model, tmp_path):
    """Real MetaSchedule tuning (build + run in worker processes, 1 trial; a minute or more) of the
    one function without a record: it gets one, every function gets a verdict against its hand
    schedule, the faster one is compiled in, and the model equals PyTorch."""
    lut, x = model
    funcs = fused_functions(lut, x, TARGET)
    first, *rest = sorted(funcs)
    db_dir = metaschedule.database_dir(tmp_path, TARGET)
    seeded = metaschedule.open_database(db_dir)
    for name in rest:  # only `first` is left to tune: MetaSchedule's per-task cost stays small
        _record_schedule(seeded, funcs[name])
    compiled = compile_model(lut, x, TARGET, ms_trials=1, tuning_dir=tmp_path)
    assert metaschedule.lookup(metaschedule.open_database(db_dir), funcs[first], TARGET) is not None
    verdicts = json.loads((db_dir / metaschedule.VERDICTS_FILE).read_text()).values()
    assert len(verdicts) == len(funcs)
    assert len(compiled.ms_scheduled) == sum(v["metaschedule_ms"] < v["hand_ms"] for v in verdicts)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lut(x), rtol=1e-5, atol=1e-5)


def test_bench_rows_labelled_with_metaschedule_budget():
    from lutnn.tools.bench_model import Case, to_markdown

    case = Case("m", 1, 1, ms={"tvm-lut": 2.0, "tvm-dense": 3.0, "torch-fp32": 4.0})
    md = to_markdown([case], "## t", ms_trials=3)
    assert "| TVM LUT whole model (compile_model), MetaSchedule 3 trials | 2.00 |" in md
    assert "| TVM dense (compile_model), MetaSchedule 3 trials (best dense) | 3.00 |" in md
    assert "| PyTorch dense fp32 | 4.00 |" in md
    assert "MetaSchedule database records" in to_markdown([case], "## t", ms_trials=0)
    assert "MetaSchedule" not in to_markdown([case], "## t")
