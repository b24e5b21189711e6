"""TVM LUT kernels against the PyTorch reference: encode codes, fp32 and int8 read-accumulate, tuning database."""
import numpy as np
import pytest
import torch
import tvm

import lutnn.tvm.tuning as tuning
from lutnn.layers import QuantizedTable
from lutnn.layers import functional as LF
from lutnn.tvm.kernels import EncodeSpec, LookupSpec
from lutnn.tvm.schedules import knob_space, scheduled
from lutnn.tvm.target import host_target
from lutnn.tvm.tuning import TuningDatabase, build_kernel, compile_kernel, tune_kernels

TARGET = host_target()


def _tv(t):
    return tvm.runtime.tensor(np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t))


def _run_encode(fn, x, p):
    codes = tvm.runtime.empty((x.shape[0], p.shape[0]), "uint8", tvm.cpu())
    fn(_tv(x), _tv(p.transpose(1, 2)), _tv(p.pow(2).sum(-1)), codes)
    return torch.from_numpy(codes.numpy())


def _run_lookup(fn, codes, table, bias, scale=None):
    y = tvm.runtime.empty((codes.shape[0], table.shape[2]), "float32", tvm.cpu())
    args = [_tv(codes), _tv(fn.prepare_table(table))] + ([_tv(scale)] if scale is not None else []) + [_tv(bias), y]
    fn(*args)
    return torch.from_numpy(y.numpy())


@pytest.mark.parametrize("n,c,v", [(64, 8, 8), (37, 12, 4), (16, 16, 2)])
def test_encode_matches_torch(n, c, v):
    torch.manual_seed(0)
    # rows near real prototypes (as after k-means), so most sub-vectors have a clear winner
    p = torch.randn(c, 16, v)
    x = (p[torch.arange(c), torch.randint(0, 16, (n, c))] + 0.3 * torch.randn(n, c, v)).reshape(n, c * v)
    got = _run_encode(build_kernel(EncodeSpec(n, c, 16, v), TARGET), x, p)
    ref = LF.encode(x, p)
    assert got.dtype == torch.uint8 and got.shape == (n, c)
    dist = LF.squared_distances(x, p).transpose(0, 1)  # [N, C, K]
    gap = (dist.gather(-1, got.long().unsqueeze(-1)) - dist.gather(-1, ref.long().unsqueeze(-1))).abs()
    # identical codes except exact float near-ties (different summation order)
    assert ((got == ref) | (gap.squeeze(-1) < 1e-4)).all()
    assert (got == ref).float().mean() > 0.99


@pytest.mark.parametrize("n,c,m", [(64, 8, 64), (33, 6, 40), (10, 4, 10)])
def test_lookup_fp32_matches_table_lookup(n, c, m):
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (n, c), dtype=torch.uint8)
    table, bias = torch.randn(c, 16, m), torch.randn(m)
    got = _run_lookup(build_kernel(LookupSpec(n, c, 16, m), TARGET), codes, table, bias)
    torch.testing.assert_close(got, LF.table_lookup(codes, table, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", [8, 300])  # int16 accumulation, and int32 once C * 127 overflows int16
def test_lookup_int8_matches_quantized_table(c):
    torch.manual_seed(2)
    n, m = 24, 32
    spec = LookupSpec(n, c, 16, m, "int8")
    assert spec.acc_dtype == ("int16" if c == 8 else "int32")
    codes = torch.randint(0, 16, (n, c), dtype=torch.uint8)
    q = QuantizedTable.from_table(torch.randn(c, 16, m), "output")
    bias = torch.randn(m)
    got = _run_lookup(build_kernel(spec, TARGET), codes, q.values, bias, q.scale)
    # integer sums are exact on both sides; only the final scale * acc + b rounds
    torch.testing.assert_close(got, q.lookup(codes, bias), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_every_tuning_knob_computes_the_same(dtype):
    torch.manual_seed(3)
    spec = LookupSpec(12, 40, 16, 48, dtype)
    codes, bias = torch.randint(0, 16, (12, 40), dtype=torch.uint8), torch.randn(48)
    q = QuantizedTable.from_table(torch.randn(40, 16, 48), "output")
    table, scale = (q.dequantize(), None) if dtype == "float32" else (q.values, q.scale)
    ref = q.lookup(codes, bias)
    space = knob_space(spec, TARGET)
    sample = space[::7]
    assert {k.c_block for k in sample} == {0, 16, 32}  # register-resident y and codebook-blocked variants
    for knobs in sample:
        got = _run_lookup(build_kernel(spec, TARGET, knobs=knobs), codes, table, bias, scale)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=str(knobs))


def test_tuning_database_is_saved_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    specs = [LookupSpec(32, 4, 16, 32), EncodeSpec(32, 4, 16, 8), LookupSpec(32, 4, 16, 32, "int8")]
    db = tune_kernels(specs, TARGET, tmp_path, trials=3)
    assert (tmp_path / tuning.DB_FILE).is_file()
    reloaded = TuningDatabase(tmp_path)
    for spec in specs:
        knobs = reloaded.knobs(spec, TARGET)
        assert knobs is not None and knobs in knob_space(spec, TARGET)
        assert reloaded.records[tuning.workload_key(spec, TARGET)]["latency_ms"] > 0

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned a workload that is already in the database")

    monkeypatch.setattr(tuning, "tune_kernel", no_tuning)
    tune_kernels(specs, TARGET, tmp_path, trials=3)  # second call: nothing to tune
    # a tuned kernel is still correct
    codes, table, bias = torch.randint(0, 16, (32, 4), dtype=torch.uint8), torch.randn(4, 16, 32), torch.randn(32)
    got = _run_lookup(build_kernel(specs[0], TARGET, db), codes, table, bias)
    torch.testing.assert_close(got, LF.table_lookup(codes, table, bias), rtol=1e-5, atol=1e-5)


def test_corrupt_database_names_the_file(tmp_path):
    (tmp_path / tuning.DB_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=tuning.DB_FILE):
        TuningDatabase(tmp_path)


def test_every_encode_layout_computes_the_same():
    torch.manual_seed(4)
    spec = EncodeSpec(32, 4, 16, 4)
    p = torch.randn(4, 16, 4)
    x = (p[torch.arange(4), torch.randint(0, 16, (32, 4))] + 0.1 * torch.randn(32, 4, 4)).reshape(32, 16)
    space = knob_space(spec, TARGET)
    assert {k.enc_rows > 0 for k in space} == {True, False}  # rows-in-lanes and k-in-lanes layouts
    for knobs in space:
        got = _run_encode(compile_kernel(scheduled(spec, TARGET, knobs), "e", TARGET), x, p)
        assert torch.equal(got, LF.encode(x, p)), knobs


def test_tvm_thread_pool_leaves_the_process_cpu_mask_alone():
    """TVM's pool used to pin the main thread to one core, and PyTorch threads started later with it."""
    import os
    import subprocess
    import sys

    code = ("import os; before = os.sched_getaffinity(0)\n"
            "from lutnn.tvm import EncodeSpec, build_kernel, host_target\n"
            "from lutnn.tvm.target import set_num_threads\n"
            "from lutnn.tvm.tuning import random_inputs\n"
            "import tvm\n"
            "set_num_threads(1); spec = EncodeSpec(64, 4, 16, 4)\n"
            "build_kernel(spec, host_target(1))(*[tvm.runtime.tensor(a) for a in random_inputs(spec)])\n"
            "print(os.sched_getaffinity(0) == before)")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
