"""TVM LUTConv2d kernels against the PyTorch LUT layer: codes, outputs, strides/padding/dilation, tuning, compile_model."""
import pytest
import torch
from torch import nn

import lutnn
import lutnn.tvm.tuning as tuning
from lutnn.layers import LUTConv2d
from lutnn.layers import functional as LF
from lutnn.tvm.conv import ConvEncodeSpec, ConvLookupSpec, conv_runner, conv_specs
from lutnn.tvm.relax_model import compile_model
from lutnn.tvm.schedules import knob_space
from lutnn.tvm.target import host_target
from lutnn.tvm.tuning import TuningDatabase

TARGET = host_target()


def _layer(cin, cout, k, stride=1, padding=0, dilation=1, v=None, tables=None, seed=0):
    """An eval-mode LUTConv2d whose prototypes are real patches plus noise (clear nearest prototypes)."""
    torch.manual_seed(seed)
    layer = LUTConv2d(cin, cout, k, stride, padding, dilation, subvec_len=v).eval()
    rows = layer.rows(torch.randn(2, cin, 9, 9))
    pick = rows[torch.randint(0, rows.shape[0], (layer.num_prototypes,))]
    p = pick.reshape(layer.num_prototypes, layer.num_codebooks, layer.subvec_len).transpose(0, 1)
    with torch.no_grad():
        layer.prototypes.copy_(p + 0.05 * torch.randn_like(p))
    if tables:
        layer.quantize_tables(tables)
    return layer


def _assert_codes_match(got, x, layer):
    rows = layer.rows(x)
    ref = layer.encode(rows)
    assert got.shape == ref.shape and got.dtype == torch.uint8
    dist = LF.squared_distances(rows, layer.prototypes.detach()).transpose(0, 1)  # [N, C, K]
    gap = (dist.gather(-1, got.long().unsqueeze(-1)) - dist.gather(-1, ref.long().unsqueeze(-1))).abs().squeeze(-1)
    # identical except exact float near-ties (the kernel drops |x|^2 and sums in another order)
    assert ((got == ref) | (gap < 1e-4)).all()
    assert (got == ref).float().mean() > 0.99


CASES = {  # cin, cout, kernel, stride, padding, dilation, V
    "3x3": (4, 8, 3, 1, 1, 1, None),
    "3x3_stride2": (4, 8, 3, 2, 1, 1, None),
    "3x3_pad0": (4, 8, 3, 1, 0, 1, None),
    "3x3_pad2_dil2": (4, 8, 3, 1, 2, 2, None),
    "3x3_stride2_dil2": (3, 8, 3, 2, 1, 2, None),
    "1x1_v4": (8, 16, 1, 1, 0, 1, 4),
    "1x1_v4_stride2": (8, 16, 1, 2, 0, 1, 4),
    "3x2_v2_mixed": (4, 8, (3, 2), (2, 1), (1, 0), (1, 2), 2),  # sub-vectors split channels
}


@pytest.mark.parametrize("case,batch", [(case, 1 + 2 * (i % 2)) for i, case in enumerate(CASES)])  # batch 1/3
def test_conv_runner_matches_lut_layer(case, batch):
    cin, cout, k, s, p, d, v = CASES[case]
    layer = _layer(cin, cout, k, s, p, d, v)
    x = torch.randn(batch, cin, 9, 11)
    run = conv_runner(layer, tuple(x.shape), target=TARGET)
    got = run(x)
    assert run.specs.lookup.table_dtype == "float32"
    _assert_codes_match(run.codes(), x, layer)
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,tables,batch", [("3x3", "output", 8), ("1x1_v4_stride2", "output", 3),
                                              ("3x3_stride2", "codebook", 1), ("c260", "output", 1)])
def test_int8_tables_match_quantized_layer(case, tables, batch):
    # C=260: C*127 overflows int16, so two int16 block sums of 130 codebooks widen into int32
    cin, cout, k, s, p, d, v = CASES[case] if case in CASES else (520, 16, 1, 1, 0, 1, 2)
    layer = _layer(cin, cout, k, s, p, d, v, tables=tables)
    x = torch.randn(batch, cin, 8, 8)
    run = conv_runner(layer, tuple(x.shape), target=TARGET)
    # per-channel scales run the int8 kernel; per-codebook scales are dequantised (as LUTBase does)
    assert run.specs.lookup.table_dtype == ("int8" if tables == "output" else "float32")
    assert run.specs.lookup.int16_blocks == (2 if case == "c260" else 1)
    got = run(x)
    _assert_codes_match(run.codes(), x, layer)
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


def test_every_knob_computes_the_same():
    layer = _layer(32, 64, 3, 1, 1, 1, None, tables="output")
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        ref = layer(x)
    specs = conv_specs(layer, tuple(x.shape))
    enc_space, look_space = knob_space(specs.encode, TARGET), knob_space(specs.lookup, TARGET)
    assert len({k.enc_rows for k in enc_space}) > 1 and {k.c_block > 0 for k in look_space} == {True, False}

    class OneChoice(TuningDatabase):  # answers every workload with the knobs under test
        def __init__(self, enc, look):
            self.choice = {specs.encode: enc, specs.lookup: look}

        def knobs(self, spec, target):
            return self.choice[spec]

    pairs = [(e, look_space[0]) for e in enc_space] + [(enc_space[0], k) for k in look_space[1::5]]
    for enc, look in pairs:
        got = conv_runner(layer, tuple(x.shape), target=TARGET, db=OneChoice(enc, look))(x)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{enc} {look}")


def test_conv_tuning_is_recorded_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    layer = _layer(4, 16, 3, 1, 1, 1, None, tables="output")
    x = torch.randn(1, 4, 8, 8)
    run = conv_runner(layer, tuple(x.shape), target=TARGET, db=TuningDatabase(tmp_path), tune_trials=2)
    db = TuningDatabase(tmp_path)
    for spec in (run.specs.encode, run.specs.lookup):
        rec = db.records[tuning.workload_key(spec, TARGET)]
        assert rec["spec"]["kind"] == spec.kind and rec["latency_ms"] > 0
        assert db.knobs(spec, TARGET) in knob_space(spec, TARGET)

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned a conv workload that is already in the database")

    monkeypatch.setattr(tuning, "tune_kernel", no_tuning)
    again = conv_runner(layer, tuple(x.shape), target=TARGET, db=db, tune_trials=2)
    with torch.no_grad():
        torch.testing.assert_close(again(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_input_is_rejected_with_a_clear_error():
    with pytest.raises(TypeError, match="got Conv2d with groups=2"):
        conv_runner(nn.Conv2d(4, 4, 3, groups=2), (1, 4, 8, 8))
    layer = _layer(4, 8, 3)
    with pytest.raises(ValueError, match=r"expects \[B, 4, H, W\], got \(1, 3, 8, 8\)"):
        conv_runner(layer, (1, 3, 8, 8))
    run = conv_runner(layer, (1, 4, 8, 8), target=TARGET)
    with pytest.raises(ValueError, match=r"built for float32 cpu input \(1, 4, 8, 8\)"):
        run(torch.randn(2, 4, 8, 8))


def _cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),  # grouped: stays dense
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()
    lut, report = lutnn.convert(net, lutnn.LUTConfig(include=["2", "4", "6"], overrides={"6": {"subvec_len": 4}},
                                                     strict=False))
    assert report.names == ["2", "6"] and report.skipped[0][0] == "4"
    rows = lutnn.capture_rows(lut, [torch.randn(8, 3, 12, 12)], max_rows=256)
    lutnn.init_prototypes(lut, rows, backend="torch", niter=3, seed=0)
    return lut.eval()


@pytest.mark.parametrize("tables", [pytest.param(None, marks=pytest.mark.slow), "output"])
def test_compiled_lut_cnn_matches_pytorch(tables, monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    lut = _cnn()
    lutnn.quantize_tables_(lut, tables)
    x = torch.randn(2, 3, 12, 12)
    compiled = compile_model(lut, x, TARGET)
    kinds = [type(s) for s in compiled.kernels]
    assert kinds == [ConvEncodeSpec, ConvLookupSpec] * 2
    assert {s.table_dtype for s in compiled.kernels if isinstance(s, ConvLookupSpec)} == {tables and "int8" or "float32"}
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lut(x), rtol=1e-5, atol=1e-5)
