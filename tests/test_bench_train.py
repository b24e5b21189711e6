"""bench-train's operator listing (``--ops``): what it reports comes from a real profiled step."""
import torch

from lutnn import LUTLinear
from lutnn.tools import bench_train


def test_top_ops_lists_the_fused_step_operators():
    torch.manual_seed(0)
    layer = LUTLinear(16, 8, subvec_len=4).train()
    x = torch.randn(32, 16, requires_grad=True)
    ops = bench_train.top_ops(bench_train._step_fn(layer, x, "random"), 50)
    names = {name for name, _, _ in ops}
    assert {"STEMatmul", "STEMatmulBackward"} <= names  # the fused Function ran, forward and backward
    assert all(ms >= 0 and calls >= 1 for _, ms, calls in ops)
    assert [ms for _, ms, _ in ops] == sorted((ms for _, ms, _ in ops), reverse=True)


def test_markdown_has_the_operator_table():
    case = bench_train.Case("linear", "tiny", lambda: None)
    res = bench_train.Result(case, ms={"dense": 1.0, "fused": 2.0}, mib={"dense": 1.0, "fused": 1.0},
                             ops=[("aten::mm", 0.5, 3)])
    md = bench_train.to_markdown([res], "header", ["fused"])
    assert "Top operators of one `fused` step, tiny" in md and "| `aten::mm` | 0.5 | 3 |" in md
