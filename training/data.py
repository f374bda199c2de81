"""Datasets as uint8 image tensors plus labels, split three ways: train / validation / test.

- The validation split is carved from the official training set by a seeded permutation. No stage ever trains on
  it; threshold calibration and model selection use it. The official test set is only ever evaluated.
- Small datasets (Fashion-MNIST, CIFAR) are held whole in memory (TensorSplit), on the GPU when training there.
- ImageFolder trees (Tiny-ImageNet, ImageNet layouts) are decoded by a DataLoader into fixed-size uint8 images
  (FolderSplit).
Batches, augmentation and normalisation, the same for both kinds, are training/batches.py's.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(RuntimeError):
    """The dataset cannot be found or read; the message says where it looked and how to fix it."""


@dataclass
class TensorSplit:
    """Images held in memory: uint8 [N, C, H, W]; `ids` are indices into the official split they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit(self.images.to(device), self.labels.to(device), self.ids)


@dataclass
class FolderSplit:
    """Images decoded on demand from an ImageFolder-style dataset; `ids` index into `dataset`."""

    dataset: torch.utils.data.Dataset
    ids: np.ndarray
    workers: int = 4

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor([self.dataset.samples[int(i)][1] for i in self.ids], dtype=torch.long)

    def to(self, device: torch.device) -> "FolderSplit":
        return self


Split = TensorSplit | FolderSplit


@dataclass
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    labels: list[str]
    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    meta: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> "DataBundle":
        return DataBundle(self.name, self.train.to(device), self.val.to(device), self.test.to(device), self.labels,
                          self.channels, self.height, self.width, self.mean, self.std, self.meta)


# ----------------------------------------------------------------------------------------------------------------
# Readers


def _read_idx(path: Path) -> np.ndarray:
    """The array in an IDX file, a fresh writable copy each call (torch wants writable memory and callers may
    change it); the decoded file is kept while its size and modification time stay the same, so a sweep that
    loads the dataset once per variant inflates the gzip once."""
    st = path.stat()
    return _read_idx_cached(str(path), st.st_size, st.st_mtime_ns).copy()


@functools.lru_cache(maxsize=8)
def _read_idx_cached(name: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / "raw" / f"{stem}.gz", root / "raw" / stem,
                      root / "FashionMNIST" / "raw" / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(root: str | None, download: bool) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list]:
    """Official 60k/10k split from IDX files (Debian's dataset-fashion-mnist), or torchvision's download."""
    roots = [Path(root)] if root else [FASHION_MNIST_DIR]
    if download and root is None:
        roots.append(Path("data"))
    for r in roots:
        paths = {split: tuple(_find_idx(r, stem) for stem in stems) for split, stems in _IDX_FILES.items()}
        if all(p is not None for pair in paths.values() for p in pair):
            out = {}
            for split, (img_path, lab_path) in paths.items():
                images, labels = _read_idx(img_path), _read_idx(lab_path)
                if len(images) != len(labels):
                    raise DatasetError(f"{img_path} has {len(images)} images but {lab_path} {len(labels)} labels")
                out[split] = (images[:, None], labels.astype(np.int64))
            return out, FASHION_MNIST_LABELS
    if download:
        import torchvision

        target = Path(root) if root else Path("data")
        out = {}
        for split in ("train", "test"):
            ds = torchvision.datasets.FashionMNIST(str(target), train=split == "train", download=True)
            out[split] = (ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64))
        return out, FASHION_MNIST_LABELS
    looked = ", ".join(str(r) for r in roots)
    raise DatasetError(
        f"Fashion-MNIST IDX files not found in {looked} (need train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]). "
        "Install them with `apt-get install dataset-fashion-mnist`, point data.root at a folder holding them, "
        "or set data.download = true where there is network."
    )


def load_cifar(name: str, root: str | None, download: bool) -> tuple[dict, list]:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    target = root or "data"
    out, labels = {}, None
    for split in ("train", "test"):
        try:
            ds = cls(target, train=split == "train", download=download)
        except RuntimeError as exc:
            raise DatasetError(
                f"{name} not found or corrupt under {target!r} ({exc}). Set data.root to the folder that holds "
                f"{cls.base_folder}/, or data.download = true where there is network."
            ) from None
        out[split] = (np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64))
        labels = list(ds.classes)
    return out, labels


def _tiny_imagenet_val(val_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]] | None:
    """Tiny-ImageNet ships its val images flat with a `val_annotations.txt` (file, wnid, box) instead of folders."""
    ann = val_dir / "val_annotations.txt"
    if not ann.is_file():
        return None
    samples = []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in class_to_idx:
            samples.append((str(val_dir / "images" / parts[0]), class_to_idx[parts[1]]))
    return samples


class _FolderImages(torch.utils.data.Dataset):
    """(path, class) pairs decoded to uint8 [C, size, size]: shorter side resized, centre crop."""

    def __init__(self, samples: list[tuple[str, int]], size: int, channels: int):
        from torchvision.transforms import v2

        self.samples = samples
        self.channels = channels
        self.transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            return self.transform(pil_to_tensor(img)), label


def load_image_folder(root: str | None, image_size: int, channels: int):
    """`root/train/<class>/...` (any depth below the class folder) and, for the test set, `root/val` or
    `root/test` in the same layout, or Tiny-ImageNet's `val/images` + `val_annotations.txt`."""
    import torchvision

    if not root:
        raise DatasetError("data.root must name the ImageFolder tree (with a train/ folder) for dataset 'imagefolder'")
    base = Path(root)
    if not (base / "train").is_dir():
        raise DatasetError(f"no train/ folder under {base}: expected {base}/train/<class>/<images>")
    train = torchvision.datasets.ImageFolder(str(base / "train"))
    if not train.samples:
        raise DatasetError(f"no images found under {base / 'train'}")
    test_samples = None
    for name in ("test", "val"):
        d = base / name
        if not d.is_dir():
            continue
        test_samples = _tiny_imagenet_val(d, train.class_to_idx)
        if test_samples is None:
            folder = torchvision.datasets.ImageFolder(str(d))
            if folder.classes != train.classes:
                raise DatasetError(f"{d} has classes {folder.classes[:5]}... that differ from train/'s")
            test_samples = folder.samples
        break
    if not test_samples:
        raise DatasetError(f"no held-out set under {base}: expected {base}/val/ or {base}/test/ with the same classes")
    return (_FolderImages(train.samples, image_size, channels), np.array(train.targets),
            _FolderImages(test_samples, image_size, channels), train.classes)


# ----------------------------------------------------------------------------------------------------------------
# Splitting and statistics


def carve_validation(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_ids, val_ids), disjoint and covering range(n_train)."""
    if not 0 < val_size < n_train:
        raise ValueError(f"data.val_size must be between 1 and {n_train - 1} for this dataset, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.double() / 255.0
    dims = (0, 2, 3)
    return x.mean(dims).tolist(), x.std(dims).tolist()


def load_dataset(cfg) -> DataBundle:
    """Build the three splits from a recipe's `data` section (training.recipe.DataConfig)."""
    if cfg.dataset in ("fashion-mnist", "cifar10", "cifar100"):
        if cfg.dataset == "fashion-mnist":
            arrays, labels = load_fashion_mnist(cfg.root, cfg.download)
        else:
            arrays, labels = load_cifar(cfg.dataset, cfg.root, cfg.download)
        train_x, train_y = arrays["train"]
        test_x, test_y = arrays["test"]
        train_ids, val_ids = carve_validation(len(train_y), cfg.val_size, cfg.split_seed)
        full_x, full_y = torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(train_y)
        train = TensorSplit(full_x[train_ids], full_y[train_ids], train_ids)
        val = TensorSplit(full_x[val_ids], full_y[val_ids], val_ids)
        test = TensorSplit(torch.from_numpy(np.ascontiguousarray(test_x)), torch.from_numpy(test_y),
                           np.arange(len(test_y)))
        mean, std = (cfg.mean, cfg.std) if cfg.mean else channel_stats(train.images)
        _, c, h, w = train.images.shape
    elif cfg.dataset == "imagefolder":
        train_ds, targets, test_ds, labels = load_image_folder(cfg.root, cfg.image_size, cfg.channels)
        train_ids, val_ids = carve_validation(len(targets), cfg.val_size, cfg.split_seed)
        train = FolderSplit(train_ds, train_ids, cfg.workers)
        val = FolderSplit(train_ds, val_ids, cfg.workers)
        test = FolderSplit(test_ds, np.arange(len(test_ds)), cfg.workers)
        if cfg.mean:
            mean, std = cfg.mean, cfg.std
        else:  # statistics of a fixed sample of training images: exact enough, and cheap on ImageNet
            sample = np.random.default_rng(cfg.split_seed).choice(train_ids, min(2000, len(train_ids)), replace=False)
            mean, std = channel_stats(torch.stack([train_ds[int(i)][0] for i in sample]))
        c, h, w = cfg.channels, cfg.image_size, cfg.image_size
    else:  # the recipe validator already refuses this; kept so a new name cannot slip through silently
        raise DatasetError(f"unknown dataset {cfg.dataset!r}")
    train, test = _truncate(train, cfg.max_train), _truncate(test, cfg.max_test)
    meta = {"train_size": len(train), "val_size": len(val), "test_size": len(test), "split_seed": cfg.split_seed}
    return DataBundle(cfg.dataset, train, val, test, list(labels), c, h, w, [float(m) for m in mean],
                      [float(s) for s in std], meta)


def _truncate(split: Split, limit: int | None) -> Split:
    if limit is None or limit >= len(split):
        return split
    if isinstance(split, TensorSplit):
        return TensorSplit(split.images[:limit], split.labels[:limit], split.ids[:limit])
    return FolderSplit(split.dataset, split.ids[:limit], split.workers)
