"""k-means engines, activation capture and prototype initialisation on real data."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import lutnn
from lutnn import LUTConfig, PrototypeFileError
from lutnn.calibrate import capture_rows, init_prototypes, init_prototypes_sequential, reconstruction_error
from lutnn.kmeans import available_backends


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def _images(pixels: torch.Tensor, size: int) -> torch.Tensor:
    x = pixels.reshape(-1, 1, 8, 8).expand(-1, 3, -1, -1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    return float(torch.cdist(x, centroids).min(-1).values.pow(2).mean())


@pytest.mark.parametrize("backend", available_backends())
def test_kmeans_beats_random_centroids_on_digits(digits, backend):
    x = digits[0]
    centroids = lutnn.kmeans(x, 10, niter=20, seed=0, backend=backend)
    assert centroids.shape == (10, 64)
    random_pick = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:10]]
    assert _inertia(x, centroids) < 0.8 * _inertia(x, random_pick)


def test_backends_agree_and_batch(digits):
    xs = digits[0].reshape(-1, 8, 8).permute(1, 0, 2).contiguous()  # 8 codebooks of 8-pixel rows
    inertias = {}
    for backend in available_backends():
        c = lutnn.kmeans(xs, 16, seed=0, backend=backend)
        assert c.shape == (8, 16, 8)
        inertias[backend] = sum(_inertia(xs[i], c[i]) for i in range(8))
    lo = min(inertias.values())
    assert all(v < 1.05 * lo for v in inertias.values()), inertias
    torch.testing.assert_close(lutnn.kmeans(xs, 16, seed=3, backend="torch"), lutnn.kmeans(xs, 16, seed=3, backend="torch"))


def test_kmeans_errors():
    with pytest.raises(ValueError, match="unknown k-means backend 'sklearn'"):
        lutnn.kmeans(torch.randn(40, 4), 4, backend="sklearn")
    with pytest.raises(ValueError, match="at least k=16 rows, got 5"):
        lutnn.kmeans(torch.randn(5, 4), 16)
    if "kmcuda" not in available_backends():
        with pytest.raises(RuntimeError, match="'kmcuda' is not usable here"):
            lutnn.kmeans(torch.randn(40, 4), 4, backend="kmcuda")


def test_auto_on_a_gpu_without_kmcuda_warns_in_one_line(monkeypatch):
    import importlib

    km = importlib.import_module("lutnn.kmeans")  # the module; lutnn.kmeans is the function
    find_spec = km.importlib.util.find_spec
    monkeypatch.setattr(km.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(km.importlib.util, "find_spec", lambda name: None if name == "libKMCUDA" else find_spec(name))
    with pytest.warns(UserWarning) as caught:
        engine = km.resolve_backend("auto")
    assert engine == next(b for b in km.CPU_PREFERENCE if b in km.available_backends())
    assert [str(w.message) for w in caught] == [f"k-means backend 'auto': libKMCUDA is not importable, using {engine!r}"]
    monkeypatch.setattr(km.torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU: falling back is the plan, not news
        assert km.resolve_backend("auto") == engine


def _trained(model: torch.nn.Module, digits, size: int, steps: int = 80) -> torch.nn.Module:
    """A few Adam steps so activations look like a trained network's, not a random one's."""
    images, labels = _images(digits[0], size), digits[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(images[idx]), labels[idx]).backward()
        opt.step()
    return model.eval()


def _deit(digits):
    vit = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2, num_classes=10
    )
    return _trained(vit, digits, 16), LUTConfig(exclude=["patch_embed.*", "head"]), 16


def _resnet(digits):
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=10)
    return cnn, LUTConfig(include=["layer4.*", "fc"]), 32


@pytest.mark.parametrize("build", [_deit, _resnet], ids=["deit", "resnet"])
def test_kmeans_init_lowers_reconstruction_error(digits, build):
    torch.manual_seed(0)
    model, cfg, size = build(digits)
    report = lutnn.convert_(model, cfg)
    images = _images(digits[0], size)
    calib = [images[i:i + 64] for i in range(0, 512, 64)]
    held_out = [images[1024 + i:1024 + i + 64] for i in range(0, 256, 64)]
    rows = capture_rows(model, calib, max_rows=2048, num_batches=len(calib))
    assert set(rows) == set(report.names)
    assert all(r.shape[0] <= 2048 for r in rows.values())
    reports = init_prototypes(model, rows, backend="auto", niter=15)
    test_rows = capture_rows(model, held_out, max_rows=2048, num_batches=len(held_out), seed=1)
    layers = lutnn.lut_layers(model)
    # baseline: K input sub-vectors drawn at random as prototypes (already data-aware)
    mean = lambda values: sum(values) / len(values)
    assert mean([r.error_kmeans for r in reports]) < 0.7 * mean([r.error_random for r in reports])
    for r in reports:
        assert r.error_kmeans < 0.9 * r.error_random, r
        # generalises to rows k-means never saw
        assert reconstruction_error(layers[r.name], test_rows[r.name]) < 0.9 * r.error_random, r.name


def test_sequential_init_fits_each_layer_behind_the_converted_ones(digits):
    """Layer 1's k-means sees layer 0's table-lookup output, not its dense output; layer 0 is unchanged."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    lutnn.convert_(mlp, LUTConfig(subvec_len=4, num_prototypes=8))
    calib = [digits[0][i:i + 128] for i in range(0, 512, 128)]
    seq = init_prototypes_sequential(mlp, iter(calib), max_rows=512, num_batches=len(calib), backend="torch", niter=10)
    assert [r.name for r in seq] == ["0", "2"]
    fitted = {n: layer.prototypes.clone() for n, layer in lutnn.lut_layers(mlp).items()}
    # by hand: layer 0 on dense rows, then layer 1 on rows captured with layer 0 looking up tables
    init_prototypes(mlp, capture_rows(mlp, calib, 512, len(calib)), backend="torch", niter=10)
    assert torch.equal(mlp[0].prototypes, fitted["0"])
    parallel = mlp[2].prototypes.clone()
    mlp[0].set_mode("lut")
    rows = capture_rows(mlp, calib, 512, len(calib), names=["2"])
    init_prototypes(mlp[2], {"": rows["2"]}, backend="torch", niter=10)
    assert torch.equal(mlp[2].prototypes, fitted["2"])
    assert not torch.allclose(parallel, fitted["2"])  # the dense-input fit differs: the option changes something


def test_capture_requires_lut_layers():
    with pytest.raises(ValueError, match="no LUT layers"):
        capture_rows(torch.nn.Linear(4, 4), [torch.randn(2, 4)])


def test_prototype_file_roundtrip_and_mismatch(tmp_path):
    make = lambda v: lutnn.convert(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)),
                                   {"subvec_len": v})[0]
    src = make(4)
    path = lutnn.save_prototypes(src, tmp_path / "p.safetensors")
    dst = make(4)
    assert lutnn.load_prototypes(dst, path) == ["0", "1"]
    torch.testing.assert_close(dst[0].prototypes, src[0].prototypes)
    torch.testing.assert_close(dst[1].log_tau, src[1].log_tau)
    with pytest.raises(PrototypeFileError, match=r"layer '0' prototypes has shape \(4, 16, 4\) in the file, "
                                                 r"\(8, 16, 2\) in the model"):
        lutnn.load_prototypes(make(2), path)
    with pytest.raises(PrototypeFileError, match="prototype file not found"):
        lutnn.load_prototypes(dst, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PrototypeFileError, match="junk.safetensors: not a readable safetensors file"):
        lutnn.load_prototypes(dst, tmp_path / "junk.safetensors")
    one = lutnn.convert(torch.nn.Sequential(torch.nn.Linear(16, 8)), {"subvec_len": 4})[0]
    with pytest.raises(PrototypeFileError, match=r"in file but not in model \['1'\]"):
        lutnn.load_prototypes(one, path)
