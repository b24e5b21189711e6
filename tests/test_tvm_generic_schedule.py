"""schedules.schedule_generic (the non-LUT part of compile_model): each rule gives the unscheduled
function's results on small shapes with odd extents (padding, vector tails) and really applies."""
import numpy as np
import pytest
import tvm
from tvm import IRModule, te, topi

from lutnn.tvm.schedules import schedule_generic
from lutnn.tvm.target import host_target

TARGET = host_target(1)


def _bmm():  # 37 x 41 tiles: rows padded to 4, columns to whole vectors
    a, b = te.placeholder((2, 37, 8), name="a"), te.placeholder((2, 8, 41), name="b")
    return [a, b, _batch_matmul(a, b)]


def _bmm_rows():  # only rows padded (64 columns are whole vectors): tiles store straight into the output
    a, b = te.placeholder((2, 37, 8), name="a"), te.placeholder((2, 8, 64), name="b")
    return [a, b, _batch_matmul(a, b)]


def _gemv():  # one row: no padding (it would copy the whole weight per call)
    x, w = te.placeholder((1, 1, 64), name="x"), te.placeholder((1, 64, 40), name="w")
    return [x, w, _batch_matmul(x, w)]


def _batch_matmul(a, b):
    k = te.reduce_axis((0, a.shape[2]), name="k")
    return te.compute((a.shape[0], a.shape[1], b.shape[2]),
                      lambda n, i, j: te.sum(a[n, i, k] * b[n, k, j], axis=k), name="bmm")


def _softmax():  # a 37-wide row: one row at a time, no vectors (tails measured slower)
    x = te.placeholder((3, 5, 37), name="x")
    return [x, topi.nn.softmax(x, axis=-1)]


def _softmax_vectors():  # a 32-wide row: max and sum as vector partials, the passes in vectors
    x = te.placeholder((3, 5, 32), name="x")
    return [x, topi.nn.softmax(x, axis=-1)]


def _layer_norm():  # a 48-wide row: sums as vector partials (rfactor)
    x, g, b = te.placeholder((5, 48), name="x"), te.placeholder((48,), name="g"), te.placeholder((48,), name="b")
    return [x, g, b, topi.nn.layer_norm(x, g, b, axis=[1], epsilon=1e-5)]


def _conv_bias():  # channels-last conv with zero padding, then a bias add
    x, w, bias = te.placeholder((1, 9, 9, 3), name="x"), te.placeholder((3, 3, 3, 16), name="w"), te.placeholder((16,), name="bias")
    y = topi.nn.conv2d_nhwc(x, w, 2, 1, 1)
    return [x, w, bias, te.compute(y.shape, lambda n, h, ww, c: y[n, h, ww, c] + bias[c], name="add")]


def _conv_7px():  # a 7-pixel output row: 7 rows x 2 vectors of accumulators, no padding copies
    x, w = te.placeholder((1, 7, 7, 16), name="x"), te.placeholder((3, 3, 16, 32), name="w")
    return [x, w, topi.nn.conv2d_nhwc(x, w, 1, 1, 1)]


def _max_pool():  # channels-last pooling: the window loops outside a vector of channels
    x = te.placeholder((1, 9, 9, 16), name="x")
    return [x, topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NHWC")]


# case -> (function, strings the scheduled script must contain, strings it must not)
CASES = {
    "bmm": (_bmm, ["bmm_pad", "T.vectorized", "T.parallel"], []),
    "bmm_rows": (_bmm_rows, ["a_pad", "T.vectorized"], ["b_pad", 'sblock("bmm_pad")']),
    "softmax": (_softmax, ["T.parallel(15)"], ["T.vectorized"]),
    "softmax_vectors": (_softmax_vectors, ["T.parallel(15)", "_rf", "T.vectorized"], []),
    "layer_norm": (_layer_norm, ["_rf", "T.vectorized"], []),
    "conv_bias": (_conv_bias, ["T.vectorized", "pad_temp"], []),
    "conv_7px": (_conv_7px, ["T.unroll(7)", "T.vectorized"], ["_pad\""]),
    "max_pool": (_max_pool, ["T.vectorized", "_init"], []),
    "gemv": (_gemv, ["T.vectorized"], ["_pad"]),
}


def _run(func, args: list[np.ndarray]) -> np.ndarray:
    fn = tvm.compile(IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    fn(*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_generic_schedule_matches_unscheduled(case):
    make, marks, absent = CASES[case]
    tensors = make()
    func = te.create_prim_func(tensors)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(s) for s in t.shape], dtype=np.float32) for t in tensors[:-1]]
    args.append(np.zeros([int(s) for s in tensors[-1].shape], np.float32))
    scheduled = schedule_generic(func, TARGET)
    script = scheduled.script()
    for mark in marks:
        assert mark in script, f"{case}: {mark!r} not in the scheduled function"
    for mark in absent:
        assert mark not in script, f"{case}: {mark!r} in the scheduled function"
    np.testing.assert_allclose(_run(scheduled, [a.copy() for a in args]), _run(func, [a.copy() for a in args]),
                               rtol=1e-5, atol=1e-5)
