"""The IDX reader and the fashion_mnist dataset, on small generated files (and the real package when installed)."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lutnn.pipeline.config import DataConfig
from lutnn.pipeline.data import FASHION_MNIST_ROOT, DataError, build_splits, load_idx_split, read_idx


def _idx(data: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    return header + data.astype(data.dtype.newbyteorder(">")).tobytes()


def _mnist_dir(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # label visible in the pixels, to check images and labels stay paired
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx(arr)
            name = f"{split}-{kind}-ubyte"
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_shapes_and_values(tmp_path, gz):
    _mnist_dir(tmp_path, gz=gz)
    images, labels = load_idx_split(tmp_path, "train")
    assert images.shape == (40, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(40)] and labels.dtype == torch.long
    assert torch.equal(images[:, 0, 0].long(), labels)


def test_read_idx_big_endian_wider_types(tmp_path):
    data = np.array([[1, -2, 300], [70000, 5, -6]], dtype=np.int32)
    (tmp_path / "x.idx").write_bytes(_idx(data, 0x0C))
    assert read_idx(tmp_path / "x.idx").tolist() == data.tolist()


def test_idx_errors_name_the_path(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(DataError, match=r"bad\.idx: IDX header says shape \(10,\) \(18 bytes\) but the file has 10"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match=r"bad\.idx: not an IDX file \(bad magic 504b0304\)"):
        read_idx(bad)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(_idx(np.zeros(100, np.uint8)))[:20])
    with pytest.raises(DataError, match=r"cut\.gz: cannot read IDX file"):
        read_idx(gz)
    _mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        build_splits(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 't10k-labels-idx1-ubyte.gz'}: missing") and "\n" not in msg
    assert "dataset-fashion-mnist" in msg


def test_fashion_mnist_splits_from_generated_files(tmp_path):
    _mnist_dir(tmp_path, n_train=100, n_test=30)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=28, val_fraction=0.2)
    s = build_splits(cfg)
    assert (len(s.train), len(s.eval), len(s.test), s.num_classes) == (80, 20, 30, 10)
    assert s.report == ("test", s.test)
    assert torch.bincount(s.eval.labels, minlength=10).tolist() == [2] * 10  # stratified
    x, y = s.test[7]
    assert x.shape == (3, 28, 28) and y.item() == 7
    assert x[0, 0, 0].item() == pytest.approx((7 / 255 - 0.5) / 0.5)  # [0, 1] then mean/std 0.5
    s2 = build_splits(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=14, eval_limit=5))
    assert s2.train[0][0].shape == (3, 14, 14) and len(s2.eval) == 5 and len(s2.test) == 30


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_package():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_idx_split(FASHION_MNIST_ROOT, split)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).tolist() == [n // 10] * 10
