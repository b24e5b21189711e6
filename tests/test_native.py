"""Native CPU kernels of the fused STE: the same codes and gradients as the eager math, and a clean fallback."""
import warnings

import pytest
import torch

from lutnn.layers import fused, native
from lutnn.layers.functional import squared_distances


@pytest.fixture
def built():
    assert native.available(), "the native kernels did not build (is a C compiler installed?)"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state that has not loaded the kernels yet, building into an empty cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("v", [1, 4, 9, 16])
@pytest.mark.parametrize("k", [2, 16, 256])
def test_encode_is_the_nearest_prototype(v, k, built):
    """Codes equal the eager argmin except where two distances tie within rounding."""
    torch.manual_seed(0)
    x, prototypes = torch.randn(203, 4 * v), torch.randn(4, k, v)  # 203 rows: a ragged block of 16
    dist = squared_distances(x, prototypes)  # [C, N, K]
    expected = dist.argmin(-1).T
    for layout in (x, x.T.contiguous().T):
        codes = native.encode(layout, prototypes)
        assert codes.dtype == torch.long and codes.shape == (203, 4)
        differ = codes != expected
        assert differ.float().mean() < 1e-3
        picked = dist.transpose(0, 1).gather(2, codes.unsqueeze(-1)).squeeze(-1)  # [N, C]
        best = dist.amin(-1).T
        torch.testing.assert_close(picked[differ], best[differ], rtol=1e-5, atol=1e-5)


def test_encode_nan_follows_torch_argmin(built):
    """A NaN distance is the minimum and the first NaN wins, as in ``torch.argmin``."""
    x, prototypes = torch.zeros(20, 4), torch.randn(1, 16, 4)
    prototypes[0, 5] = float("nan")
    prototypes[0, 9] = float("nan")
    x[3, 0] = float("nan")  # every distance of row 3 is NaN
    expected = squared_distances(x, prototypes).argmin(-1).T
    assert expected[0, 0] == 5 and expected[3, 0] == 0
    assert torch.equal(native.encode(x, prototypes), expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("v,k", [(4, 16), (9, 16), (2, 5), (1, 256)])
def test_soft_backward_matches_eager(v, k, threads, built):
    """One native pass gives the eager chunk backward's dx, Σ dzᵀx, Σ dz, Σ dz·z and hard gradient,
    from row-major or D-major inputs, on one thread or split over two."""
    torch.manual_seed(0)
    n, c = 600, 3
    x, g = torch.randn(n, c * v), torch.randn(n, c * v)
    prototypes, inv_tau = torch.randn(c, k, v), torch.tensor(0.6)
    codes = squared_distances(x, prototypes).argmin(-1).T.contiguous()
    dx_t, dz_x, dz_sum, dz_dot_z = fused.soft_backward_chunk(x.T.contiguous(), g.T.contiguous(), prototypes, inv_tau)
    hard = torch.zeros_like(prototypes)
    fused._hard_proto_grad(codes, g.T.contiguous(), prototypes, hard)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for xs, gs, dx in ((x, g, torch.empty(n, c * v)), (x.T.contiguous().T, g.T.contiguous().T, None)):
            acc = [torch.zeros_like(prototypes), torch.zeros(c, k), torch.zeros_like(prototypes)]
            code_arg = codes.to(torch.uint8) if k <= 256 else codes
            total = native.soft_backward(xs, gs, dx, code_arg, prototypes, float(inv_tau), *acc)
            if dx is not None:
                torch.testing.assert_close(dx, dx_t.T, rtol=1e-4, atol=1e-5)
            for got, want in zip(acc, (dz_x, dz_sum, hard)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert total == pytest.approx(float(dz_dot_z), rel=1e-4, abs=1e-4)
    finally:
        torch.set_num_threads(old)


def test_build_is_cached_per_source_and_cpu(fresh):
    assert native.available()
    (so,) = fresh.glob("ste_cpu_*.so")
    mtime = so.stat().st_mtime_ns
    native._state.clear()
    assert native.available() and so.stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_missing_compiler_warns_once_and_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match=r"no C compiler \('/nonexistent/cc'\).*eager path"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.usable(torch.zeros(1))  # decided once per process: no second warning
    assert not list(fresh.glob("*.so"))


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv(native.ENV_DISABLE, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()
