"""Datasets by name, offline only.

* ``digits``      — scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes):
  real data that needs no download. Grey images become 3-channel tensors resized to
  ``data.image_size``; the train/val split is stratified and fixed by ``data.split_seed``.
* ``fashion_mnist`` — Fashion-MNIST (or any MNIST-format set) from IDX files in ``data.root``
  (default: the Debian package ``dataset-fashion-mnist``'s directory): 60,000 training images,
  of which a stratified ``data.val_fraction`` is held out for checkpoint selection, and the
  10,000-image **test** split that final results are reported on.
* ``cifar10``     — torchvision ``CIFAR10(root, download=False)`` (``root/cifar-10-batches-py``).
* ``imagefolder`` — ``root/train/<class>/*`` and ``root/val/<class>/*`` (the ImageNet layout).

Every loader raises :class:`DataError` with what to install or where to put files when the
data is missing; nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .cli import first_line
from .config import ConfigError, DataConfig


class DataError(RuntimeError):
    """Dataset missing or malformed; the message says what to install or where files go."""


@dataclass
class Splits:
    """``eval`` selects checkpoints during training; ``test`` (when the dataset has one apart from
    ``eval``) is what final results are reported on."""

    train: Dataset
    eval: Dataset
    num_classes: int
    test: Dataset | None = None

    @property
    def report(self) -> tuple[str, Dataset]:
        """``(split name, dataset)`` that final accuracies are measured on."""
        return ("test", self.test) if self.test is not None else ("validation", self.eval)


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

def _to_model_input(images: Tensor, cfg: DataConfig) -> Tensor:
    """Grey ``[N, 1, h, w]`` in [0, 1] -> normalised 3-channel ``[N, 3, S, S]`` (S = ``data.image_size``)."""
    if images.shape[-1] != cfg.image_size:
        images = F.interpolate(images, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


def _stratified_split(labels: Tensor, cfg: DataConfig) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    return train_test_split(list(range(len(labels))), test_size=cfg.val_fraction, random_state=cfg.split_seed,
                            stratify=labels.numpy())


def _shift(cfg: DataConfig) -> RandomShift | None:
    return RandomShift(max(1, cfg.image_size // 8)) if cfg.augment in ("shift", "crop_flip", "timm") else None


@register_dataset("digits", needs_root=False)
def _digits(cfg: DataConfig) -> Splits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = _to_model_input(images, cfg)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = _stratified_split(labels, cfg)
    train = TransformedTensors(images[train_idx].contiguous(), labels[train_idx], _shift(cfg))
    val = TransformedTensors(images[val_idx].contiguous(), labels[val_idx], None)
    return Splits(train, val, 10)


# IDX element types (the third magic byte) -> (numpy dtype string, big-endian)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {  # split -> (images, labels) base names; a ".gz" or a raw file is accepted
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_HINT = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist; "
                      "bash scripts/setup.sh does it as root) or put the four MNIST-format IDX files in data.root")


def read_idx(path: str | Path) -> Tensor:
    """An IDX file (gzip or raw) as a tensor: big-endian header ``0 0 <type> <ndim>``, ``ndim`` int32 sizes, data."""
    import numpy as np

    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read IDX file ({first_line(err)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + dtype.itemsize * int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says shape {tuple(shape)} ({expected} bytes) but the file has {len(raw)}")
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def _idx_path(root: Path, base: str) -> Path:
    for name in (base + ".gz", base):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root / (base + '.gz')}: missing (nor {base} raw); {FASHION_MNIST_HINT}")


def load_idx_split(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, H, W], labels int64 [N])`` of an MNIST-format split (``train`` or ``test``)."""
    root = Path(root).expanduser()
    img_path, lbl_path = (_idx_path(root, base) for base in IDX_FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dim() != 3:
        raise DataError(f"{img_path}: expected images [N, H, W], got shape {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{lbl_path}: expected {len(images)} labels, got shape {tuple(labels.shape)}")
    return images, labels.long()


@register_dataset("fashion_mnist", needs_root=False)
def _fashion_mnist(cfg: DataConfig) -> Splits:
    root = cfg.root or FASHION_MNIST_ROOT
    images, labels = load_idx_split(root, "train")
    test_images, test_labels = load_idx_split(root, "test")
    num_classes = int(max(labels.max(), test_labels.max())) + 1

    def prepare(x: Tensor) -> Tensor:
        return _to_model_input(x.float().unsqueeze(1) / 255.0, cfg).contiguous()

    train_idx, val_idx = _stratified_split(labels, cfg)
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
    train = TransformedTensors(prepare(images[train_idx]), labels[train_idx], _shift(cfg))
    val = TransformedTensors(prepare(images[val_idx]), labels[val_idx], None)
    test = TransformedTensors(prepare(test_images), test_labels, None)
    return Splits(train, val, num_classes, test)


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
    if DATASETS[cfg.name].needs_root and cfg.root is None:
        raise ConfigError(f"{where}: data.root: dataset {cfg.name!r} needs a local path (data.root)")
    if cfg.root is not None and not Path(cfg.root).expanduser().exists():
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
