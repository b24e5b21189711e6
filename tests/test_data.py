"""Datasets: bundled digits, and ImageFolder / CIFAR-10 layouts generated from the digits."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from lutnn.pipeline.config import DataConfig
from lutnn.pipeline.data import DataError, ShardSampler, build_splits, make_loader


def _digit_images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real digits as uint8 RGB ``[n, size, size, 3]`` and their labels."""
    d = load_digits()
    imgs = [np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((size, size))) for im in d.images[:n]]
    return np.repeat(np.stack(imgs)[..., None], 3, axis=-1), d.target[:n]


def test_digits_split_is_fixed_and_stratified():
    cfg = DataConfig(image_size=16)
    a, b = build_splits(cfg), build_splits(cfg)
    assert (len(a.train), len(a.eval), a.num_classes) == (1437, 360, 10)
    x, y = a.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey -> 3 identical channels
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # normalised with mean=std=0.5
    assert torch.equal(a.eval.images, b.eval.images)
    counts = torch.bincount(a.eval.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    other = build_splits(DataConfig(image_size=16, split_seed=1))
    assert not torch.equal(a.eval.labels, other.eval.labels)


def test_digits_limits_and_shift_augment():
    cfg = DataConfig(image_size=8, train_limit=100, eval_limit=10, augment="shift")
    s = build_splits(cfg)
    assert (len(s.train), len(s.eval)) == (100, 10)
    torch.manual_seed(0)
    views = torch.stack([s.train[3][0] for _ in range(8)])
    assert not all(torch.equal(views[0], v) for v in views[1:])  # random shifts
    assert torch.equal(s.eval[3][0], s.eval[3][0])


def test_imagefolder_from_digits(tmp_path):
    imgs, labels = _digit_images(200, 12)
    for c in (0, 1, 2):
        idx = np.flatnonzero(labels == c)
        for split, picks in (("train", idx[:6]), ("val", idx[6:8])):
            folder = tmp_path / split / f"digit_{c}"
            folder.mkdir(parents=True)
            for i in picks:
                Image.fromarray(imgs[i]).save(folder / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, eval_batch_size=8, augment="crop_flip")
    s = build_splits(cfg)
    assert (len(s.train), len(s.eval), s.num_classes) == (18, 6, 3)
    x, y = next(iter(make_loader(s.eval, cfg, train=False)))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    xt, _ = next(iter(make_loader(s.train, cfg, train=True)))
    assert xt.shape == (18, 3, 16, 16)  # augmented training batch keeps the size


def _write_cifar(root, n_train=20, n_test=10):
    imgs, labels = _digit_images(n_train + n_test, 32)
    data = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)  # CIFAR rows: RGB planes, 3072 bytes
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = n_train // 5
    for b in range(5):
        sl = slice(b * per, (b + 1) * per)
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({"data": data[sl], "labels": labels[sl].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data[n_train:], "labels": labels[n_train:].tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return labels


def test_cifar10_python_batches(tmp_path):
    labels = _write_cifar(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), image_size=32, eval_batch_size=4, augment="crop_flip",
                     mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    s = build_splits(cfg)
    assert (len(s.train), len(s.eval), s.num_classes) == (20, 10, 10)
    x, y = next(iter(make_loader(s.eval, cfg, train=False)))
    assert x.shape == (4, 3, 32, 32)
    assert y.tolist() == labels[20:24].tolist()
    # the digit is bright on dark: the centre is brighter than the corner after normalisation
    assert x[:, :, 12:20, 12:20].mean() > x[:, :, :4, :4].mean()


def test_missing_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    with pytest.raises(DataError, match="root/train"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_shard_sampler_partitions_and_reshuffles():
    ranks = [ShardSampler(10, r, 2, shuffle=True, seed=3) for r in range(2)]
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != a
    ranks[0].set_epoch(0)
    assert list(ranks[0]) == a  # order is a function of (seed, epoch) only
    evals = [list(ShardSampler(11, r, 2)) for r in range(2)]
    assert sorted(evals[0] + evals[1]) == list(range(11))  # eval: every sample exactly once, no padding
