"""nn.MaxPool2d on the TVM kernel (lutnn.tvm.pool): the same maxima as PyTorch, and accelerate_ runs it."""
import copy

import pytest
import torch
from torch import nn

from lutnn.tvm import AccelerateConfig, accelerate_, unaccelerate_
from lutnn.tvm.accelerate import is_accelerated
from lutnn.tvm.pool import max_pool_runner

CASES = {  # name: (MaxPool2d args, input shape)
    "resnet-stem 3x3/2 p1": ((3, 2, 1), (1, 8, 28, 28)),
    "2x2/2": ((2, 2, 0), (3, 5, 8, 12)),
    "3x3/1 p1 dilation 2": ((3, 1, 1, 2), (2, 4, 9, 12)),
    "3x2 kernel, 2x1 stride, odd sizes": (((3, 2), (2, 1), (1, 0)), (2, 3, 11, 7)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_max_pool_kernel_equals_pytorch(name):
    args, shape = CASES[name]
    pool = nn.MaxPool2d(*args)
    torch.manual_seed(0)
    x = torch.randn(shape)
    run = max_pool_runner(pool, shape)
    assert torch.equal(run(x), pool(x))
    x_t = torch.randn(shape[0], shape[1], shape[3], shape[2]).transpose(2, 3)  # not contiguous: copied first
    assert torch.equal(run(x_t), pool(x_t))


def test_unsupported_pools_are_refused_with_the_reason():
    with pytest.raises(NotImplementedError, match="return_indices and ceil_mode are not supported"):
        max_pool_runner(nn.MaxPool2d(3, 2, ceil_mode=True), (1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"input \(1, 2, 2, 2\) is smaller than the pooling window"):
        max_pool_runner(nn.MaxPool2d(3, 1), (1, 2, 2, 2))


def test_accelerate_runs_max_pools_unless_told_not_to():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()
    x = torch.randn(2, 3, 14, 14)
    acc = copy.deepcopy(net)
    assert accelerate_(acc).accelerated == ["2"]
    assert is_accelerated(acc[2])
    with torch.no_grad():
        assert torch.equal(acc(x), net(x))
    unaccelerate_(acc)
    assert not is_accelerated(acc[2]) and "forward" not in acc[2].__dict__
    assert accelerate_(acc, AccelerateConfig(non_lut_ops=False)).accelerated == []


def test_nan_propagates_like_pytorch():
    pool, x = nn.MaxPool2d(3, 2, 1), torch.randn(1, 2, 8, 8)
    x[0, 0, 3, 3] = x[0, 1, 0, 0] = float("nan")
    got, ref = max_pool_runner(pool, x.shape)(x), pool(x)
    assert torch.equal(got.isnan(), ref.isnan()) and int(ref.isnan().sum()) == 5
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())
