"""Datasets by name, offline only.

* ``digits``      — scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes):
  real data that needs no download. Grey images become 3-channel tensors resized to
  ``data.image_size``; the train/val split is stratified and fixed by ``data.split_seed``.
* ``cifar10``     — torchvision ``CIFAR10(root, download=False)`` (``root/cifar-10-batches-py``).
* ``imagefolder`` — ``root/train/<class>/*`` and ``root/val/<class>/*`` (the ImageNet layout).

Every loader raises :class:`DataError` with what to install or where to put files when the
data is missing; nothing is ever downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .config import ConfigError, DataConfig


class DataError(RuntimeError):
    """Dataset missing or malformed; the message says what to install or where files go."""


@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    num_classes: int


@dataclass(frozen=True)
class DatasetSpec:
    build: Callable[[DataConfig], Splits]
    needs_root: bool


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, needs_root: bool) -> Callable[[Callable[[DataConfig], Splits]], Callable]:
    def wrap(fn: Callable[[DataConfig], Splits]) -> Callable[[DataConfig], Splits]:
        DATASETS[name] = DatasetSpec(fn, needs_root)
        return fn
    return wrap


# --------------------------------------------------------------------------- transforms

class RandomShift:
    """Translate a tensor image by up to ``pad`` pixels (zero-padded crop): cheap augmentation for tiny images."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, x: Tensor) -> Tensor:
        if self.pad == 0:
            return x
        h, w = x.shape[-2:]
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        return F.pad(x, [self.pad] * 4)[..., dy:dy + h, dx:dx + w]


class TransformedTensors(Dataset):
    """``(image, label)`` tensors with a per-sample transform applied on access."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        return (self.transform(x) if self.transform else x), self.labels[i]


def image_transforms(cfg: DataConfig, train: bool):
    """torchvision/timm transforms for PIL images (CIFAR-10, ImageFolder)."""
    from torchvision import transforms as T

    size = cfg.image_size
    if train and cfg.augment == "timm":
        from timm.data import create_transform

        return create_transform(size, is_training=True, mean=tuple(cfg.mean), std=tuple(cfg.std))
    if not train and cfg.augment == "timm":
        from timm.data import create_transform

        return create_transform(size, is_training=False, mean=tuple(cfg.mean), std=tuple(cfg.std))
    ops = [T.Resize(size), T.CenterCrop(size)]
    if train and cfg.augment == "crop_flip":
        ops = [T.Resize(size), T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()]
    elif train and cfg.augment == "shift":
        ops.append(T.RandomCrop(size, padding=max(1, size // 8)))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


# --------------------------------------------------------------------------- datasets

@register_dataset("digits", needs_root=False)
def _digits(cfg: DataConfig) -> Splits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    images = (images.expand(-1, 3, -1, -1) - mean) / std
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=cfg.val_fraction, random_state=cfg.split_seed, stratify=digits.target
    )
    shift = RandomShift(max(1, cfg.image_size // 8)) if cfg.augment in ("shift", "crop_flip", "timm") else None
    train = TransformedTensors(images[train_idx].contiguous(), labels[train_idx], shift)
    val = TransformedTensors(images[val_idx].contiguous(), labels[val_idx], None)
    return Splits(train, val, 10)


def _cifar10_class():
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR-10 reader; files must exist but may be a re-packed subset (no md5 check)."""

        meta = {**CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    return LocalCIFAR10


@register_dataset("cifar10", needs_root=True)
def _cifar10(cfg: DataConfig) -> Splits:
    CIFAR10 = _cifar10_class()
    root = Path(cfg.root).expanduser()
    if not (root / "cifar-10-batches-py").is_dir():
        raise DataError(
            f"data.root={cfg.root!r}: no cifar-10-batches-py/ folder there; download "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a connected machine and untar it into "
            f"{root} (nothing is downloaded at run time)"
        )
    try:
        train = CIFAR10(str(root), train=True, download=False, transform=image_transforms(cfg, True))
        val = CIFAR10(str(root), train=False, download=False, transform=image_transforms(cfg, False))
    except RuntimeError as err:
        raise DataError(f"data.root={cfg.root!r}: CIFAR-10 files are incomplete or corrupt ({err})") from None
    return Splits(train, val, 10)


@register_dataset("imagefolder", needs_root=True)
def _imagefolder(cfg: DataConfig) -> Splits:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root).expanduser()
    dirs = {split: root / split for split in ("train", "val")}
    missing = [str(p) for p in dirs.values() if not p.is_dir()]
    if missing:
        raise DataError(
            f"data.root={cfg.root!r}: expected the ImageNet layout root/train/<class>/*.JPEG and "
            f"root/val/<class>/*.JPEG; missing {missing}"
        )
    try:
        train = ImageFolder(str(dirs["train"]), transform=image_transforms(cfg, True))
        val = ImageFolder(str(dirs["val"]), transform=image_transforms(cfg, False))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"data.root={cfg.root!r}: {err}") from None
    if train.classes != val.classes:
        raise DataError(f"data.root={cfg.root!r}: train/ and val/ have different class folders")
    return Splits(train, val, len(train.classes))


# --------------------------------------------------------------------------- loaders

class ShardSampler(Sampler[int]):
    """Indices for one of ``world`` ranks: shuffled per epoch from ``(seed, epoch)`` when training.

    Unlike ``DistributedSampler`` it never pads, so sharded evaluation counts every sample
    exactly once; training shards are trimmed to equal length so DDP ranks step together.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0) -> None:
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world))
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        per_rank = self.n // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return self.n // self.world if self.shuffle else len(range(self.rank, self.n, self.world))


def check_data_config(cfg: DataConfig, where: str) -> None:
    """Registry checks of ``data``: a known dataset, and its local root when it needs one."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"{where}: data.name: unknown dataset {cfg.name!r}; known: {sorted(DATASETS)}")
    if DATASETS[cfg.name].needs_root:
        if cfg.root is None:
            raise ConfigError(f"{where}: data.root: dataset {cfg.name!r} needs a local path (data.root)")
        if not Path(cfg.root).expanduser().exists():
            raise ConfigError(f"{where}: data.root: path {cfg.root!r} does not exist")


def build_splits(cfg: DataConfig) -> Splits:
    if cfg.name not in DATASETS:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}; known: {sorted(DATASETS)}")
    splits = DATASETS[cfg.name].build(cfg)
    if cfg.train_limit is not None:
        splits.train = Subset(splits.train, range(min(cfg.train_limit, len(splits.train))))
    if cfg.eval_limit is not None:
        splits.eval = Subset(splits.eval, range(min(cfg.eval_limit, len(splits.eval))))
    return splits


def make_loader(dataset: Dataset, cfg: DataConfig, train: bool, seed: int = 0, rank: int = 0,
                world: int = 1) -> DataLoader:
    """Deterministic loader: training order depends only on ``(seed, epoch)`` via :class:`ShardSampler`."""
    sampler = ShardSampler(len(dataset), rank, world, shuffle=train, seed=seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def input_size(cfg: DataConfig) -> tuple[int, int, int]:
    return (3, cfg.image_size, cfg.image_size)


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Make epoch ``epoch``'s order and worker seeds a function of ``(seed, epoch)`` only (exact resume)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100003 + epoch)
