"""Shuffle read-accumulate kernels (lutnn.tvm.shuffle): bit-exact against the gather kernel,
CPU-feature fallback, K != 16 fallback, and the tuner's recorded choice."""
import functools

import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target

import lutnn.tvm.tuning as tuning
from lutnn.layers import QuantizedTable
from lutnn.tvm.kernels import LookupSpec
from lutnn.tvm.schedules import Knobs, default_knobs, knob_space, scheduled
from lutnn.tvm.shuffle import SHUFFLE_KERNELS, prepare_table, shuffle_kernels
from lutnn.tvm.target import cpu_has, host_target
from lutnn.tvm.tuning import TuningDatabase, build_kernel, tune_kernels

HOST = host_target(1)
# Kernels this machine can execute; each is compiled for a CPU that has exactly what it needs.
RUNNABLE = [k for k, (feats, _) in SHUFFLE_KERNELS.items() if cpu_has(HOST, *feats)]
NO_SIMD = Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 1})  # SSE2 only


def _inputs(n: int, c: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, c), dtype=torch.uint8, generator=g)
    q = QuantizedTable.from_table(torch.randn(c, 16, m, generator=g), "output")
    # the extremes (+-127) must sum exactly too
    q.values[0, 0, :] = 127
    q.values[-1, 15, :] = -127
    return codes, q, torch.randn(m, generator=g)


def _run(kernel, codes, q, bias) -> np.ndarray:
    y = tvm.runtime.empty((codes.shape[0], q.values.shape[2]), "float32", tvm.cpu())
    args = [codes.numpy(), kernel.prepare_table(q.values.numpy()), q.scale.numpy(), bias.numpy()]
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], y)
    return y.numpy()


def _gather(spec, target=HOST):
    return build_kernel(spec, target, knobs=default_knobs(spec, target, gather_only=True))


@pytest.mark.skipif(not RUNNABLE, reason="CPU has no AVX2")
@pytest.mark.parametrize("kernel", RUNNABLE)
def test_shuffle_equals_gather_bit_for_bit(kernel):
    """N not a multiple of the 16/32/64-row vector, C odd and not a multiple of 4, both tile
    widths; and C=600, more than the 256 codebooks one uint16 pass of pshufb may sum."""
    for n, c, m in [(37, 7, 24), (5, 600, 4)]:
        spec = LookupSpec(n, c, 16, m, "int8")
        codes, q, bias = _inputs(n, c, m)
        ref = _gather_output(n, c, m)
        for cols in sorted({k.cols for k in knob_space(spec, HOST) if k.kernel == kernel}):
            knobs = Knobs(rows=0, cols=cols, c_block=0, kernel=kernel)
            assert np.array_equal(_run(build_kernel(spec, HOST, knobs=knobs), codes, q, bias), ref), (spec, cols)


@functools.cache
def _gather_output(n: int, c: int, m: int) -> np.ndarray:
    spec = LookupSpec(n, c, 16, m, "int8")
    codes, q, bias = _inputs(n, c, m)
    ref = _run(_gather(spec), codes, q, bias)
    # the gather kernel is exact itself: integer sums, then scale * acc + bias
    torch.testing.assert_close(torch.from_numpy(ref), q.lookup(codes, bias), rtol=1e-6, atol=1e-5)
    return ref


def test_kernels_follow_cpu_features():
    spec = LookupSpec(64, 8, 16, 16, "int8")
    cpu = lambda mcpu: Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 1})  # noqa: E731
    assert shuffle_kernels(spec, cpu("znver3")) == ["pshufb256"]  # AVX2 only (Zen 3)
    assert shuffle_kernels(spec, cpu("skylake-avx512")) == ["pshufb512", "pshufb256"]
    assert shuffle_kernels(spec, cpu("sapphirerapids")) == ["vpermb512", "pshufb512", "pshufb256"]
    assert default_knobs(spec, cpu("sapphirerapids")).kernel == "vpermb512"


def test_cpu_without_simd_falls_back_to_exact_gather():
    spec = LookupSpec(37, 7, 16, 24, "int8")
    assert shuffle_kernels(spec, NO_SIMD) == []
    assert {k.kernel for k in knob_space(spec, NO_SIMD)} == {"gather"}
    kernel = build_kernel(spec, NO_SIMD)
    assert kernel.kernel == "gather"
    codes, q, bias = _inputs(37, 7, 24)
    got = _run(kernel, codes, q, bias)
    torch.testing.assert_close(torch.from_numpy(got), q.lookup(codes, bias), rtol=1e-6, atol=1e-5)
    # asking for a shuffle kernel the target lacks is an error naming the kernel, not a crash
    with pytest.raises(ValueError, match="pshufb256"):
        scheduled(spec, NO_SIMD, Knobs(rows=0, cols=4, c_block=0, kernel="pshufb256"))


@pytest.mark.parametrize("k,dtype", [(8, "int8"), (32, "int8"), (16, "float32")])
def test_not_k16_int8_falls_back_to_gather(k, dtype):
    spec = LookupSpec(32, 4, k, 16, dtype)
    assert shuffle_kernels(spec, HOST) == []
    assert default_knobs(spec, HOST).kernel == "gather"
    assert {kn.kernel for kn in knob_space(spec, HOST)} == {"gather"}
    with pytest.raises(ValueError, match=f"needs an int8 \\[C, 16, M\\] table, got {np.dtype(dtype)}"):
        prepare_table(np.zeros((4, k, 16), dtype), "vpermb512")


def test_unprepared_table_is_a_clear_error():
    if not RUNNABLE:
        pytest.skip("CPU has no AVX2")
    spec = LookupSpec(16, 8, 16, 8, "int8")
    kernel = build_kernel(spec, HOST, knobs=Knobs(rows=0, cols=4, c_block=0, kernel=RUNNABLE[0]))
    codes, q, bias = _inputs(16, 8, 8)
    args = [codes.numpy(), q.values.numpy(), q.scale.numpy(), bias.numpy(), np.zeros((16, 8), np.float32)]
    with pytest.raises(ValueError, match="pass kernel.prepare_table"):
        kernel(*[tvm.runtime.tensor(a) for a in args])


def test_tuner_records_gather_vs_shuffle_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    spec = LookupSpec(64, 8, 16, 16, "int8")
    # fake timings (no compiling): the choice must follow the measurement
    fake_ms = {"gather": 2.0, "pshufb256": 1.0, "pshufb512": 0.9, "vpermb512": 0.5}
    monkeypatch.setattr(tuning, "compile_kernel", lambda func, name, target: None)
    monkeypatch.setattr(tuning, "time_kernel", lambda fn, args, clock=None: fake_ms[fn.kernel])
    avx2 = Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 1})
    db = tune_kernels([spec], avx2, tmp_path, trials=2)
    rec = TuningDatabase(tmp_path).records[tuning.workload_key(spec, avx2)]
    assert rec["knobs"]["kernel"] == "pshufb256" and rec["latency_ms"] == 1.0
    assert rec["kernels"] == {"gather": 2.0, "pshufb256": 1.0}  # both kinds were timed
    assert build_kernel(spec, avx2, db).kernel == "pshufb256"
    gather = db.knobs(spec, avx2, gather_only=True)  # for callers holding the plain table layout
    assert gather.kernel == "gather" and gather == Knobs(**rec["gather_knobs"])
    # a faster gather kernel is recorded as the choice
    fake_ms["gather"] = 0.1
    spec_b = LookupSpec(65, 8, 16, 16, "int8")
    tune_kernels([spec_b], avx2, tmp_path, trials=2)
    assert TuningDatabase(tmp_path).knobs(spec_b, avx2).kernel == "gather"
