import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images, real_fashion_mnist_or_fail
from reskd.training.batches import Augmentation, Normalizer, augment, batches, random_erase
from reskd.training.data import DatasetError, FolderSplit, TensorSplit, carve_validation, load_dataset
from reskd.training.recipe import DataConfig


def test_idx_files_load_with_the_official_split(tiny_idx):
    data = load_dataset(DataConfig(dataset="fashion-mnist", root=str(tiny_idx), val_size=100))
    assert (len(data.train), len(data.val), len(data.test)) == (600, 100, 200)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 12, 12)
    assert (data.channels, data.height, data.width) == (1, 12, 12)
    assert data.labels[0] == "T-shirt/top" and len(data.labels) == 10
    assert 0 < data.mean[0] < 1 and data.std[0] > 0


def test_validation_split_is_deterministic_disjoint_and_complete():
    a_train, a_val = carve_validation(1000, 100, seed=3)
    b_train, b_val = carve_validation(1000, 100, seed=3)
    assert np.array_equal(a_val, b_val) and np.array_equal(a_train, b_train)
    assert not set(a_train) & set(a_val)
    assert sorted(set(a_train) | set(a_val)) == list(range(1000))
    _, other_val = carve_validation(1000, 100, seed=4)
    assert not np.array_equal(a_val, other_val)
    with pytest.raises(ValueError, match="val_size"):
        carve_validation(100, 100, seed=0)


def test_missing_dataset_says_how_to_fix_it(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path)))
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    with pytest.raises(DatasetError, match="cifar10 not found"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_truncated_idx_is_refused(tmp_path, tiny_idx):
    import gzip

    for f in tiny_idx.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-50]))
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path), val_size=10))


def test_cifar_through_torchvision(tmp_path, monkeypatch):
    """Generated files in CIFAR-10's pickle layout, read by torchvision's own CIFAR10 (only its md5 checks, which
    cannot match generated files, are bypassed)."""
    import torchvision.datasets.cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 30)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=10))
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.labels[3] == "c3"
    # HWC pickle rows become CHW tensors: the first pixel's red value is the row's first byte.
    with open(base / "test_batch", "rb") as f:
        first = pickle.load(f)["data"][0]
    assert data.test.images[0, 0, 0, 0].item() == first[0]
    assert data.test.images[0, 1, 0, 0].item() == first[1024]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_tiny_imagenet_layout(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["n01", "n02", "n03"]
    for c in classes:
        for i in range(6):
            _write_png(tmp_path / "train" / c / "images" / f"{c}_{i}.png", rng.integers(0, 256, (20, 24, 3), np.uint8))
    lines = []
    for i in range(4):
        _write_png(tmp_path / "val" / "images" / f"val_{i}.png", rng.integers(0, 256, (16, 16, 3), np.uint8))
        lines.append(f"val_{i}.png\t{classes[i % 3]}\t0\t0\t10\t10")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines))
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, channels=3, val_size=3,
                                   workers=0))
    assert isinstance(data.train, FolderSplit)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 3, 4)
    assert data.labels == classes
    assert data.test.labels.tolist() == [0, 1, 2, 0]
    x, y = next(batches(data.train, 5, normalizer=Normalizer(data.mean, data.std, torch.device("cpu")),
                        device=torch.device("cpu"), shuffle=True, augmentation=Augmentation(1, True)))
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and y.shape == (5,)


def test_image_folder_grayscale_with_imagenet_layout(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(4):
                _write_png(tmp_path / split / c / f"{i}.png", rng.integers(0, 256, (10, 10, 3), np.uint8))
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=10, channels=1, val_size=2,
                                   workers=0))
    assert data.channels == 1 and data.test.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_augment_shifts_and_flips_without_changing_content():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = augment(images, 0, True, gen)
    for i in range(2):
        assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))
    shifted = augment(images, 2, False, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape
    for i in range(2):  # a crop of the zero-padded image: every non-zero pixel value comes from the original
        values = set(shifted[i].flatten().tolist()) - {0}
        assert values <= set(images[i].flatten().tolist())


def test_random_erasing_replaces_one_rectangle_per_chosen_sample():
    images = torch.full((400, 1, 28, 28), 7, dtype=torch.uint8)
    out = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    changed = out != images
    erased = changed.flatten(1).any(1)
    assert 0.4 < erased.float().mean() < 0.6  # about half the samples, as p says
    for i in torch.nonzero(erased).flatten().tolist():
        rows, cols = torch.nonzero(changed[i, 0], as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert height * width <= 0.4 * 28 * 28 + 28 + 28  # 2-40% of the area (rounding adds at most a row and column)
    assert torch.equal(random_erase(images, 0.0, torch.Generator().manual_seed(0)), images)
    again = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # the generator decides everything


def test_batches_cover_the_split_once_and_normalise():
    images, labels = make_images(50, 10, 8, 1, seed=0)
    split = TensorSplit(torch.from_numpy(images), torch.from_numpy(labels).long(), np.arange(50))
    norm = Normalizer([0.5], [0.25], torch.device("cpu"))
    seen = torch.cat([y for _, y in batches(split, 16, normalizer=norm, device=torch.device("cpu"))])
    assert torch.equal(seen, split.labels)
    x, _ = next(batches(split, 16, normalizer=norm, device=torch.device("cpu")))
    assert torch.allclose(x, (split.images[:16].float() / 255 - 0.5) / 0.25, atol=1e-5)
    dropped = list(batches(split, 16, normalizer=norm, device=torch.device("cpu"), shuffle=True, drop_last=True))
    assert [len(y) for _, y in dropped] == [16, 16, 16]


def shares_of(split, world_size: int, batch_size: int = 6) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each rank's training batches (shuffled, augmented with crop, flip and erasing), and the whole batches as
    one process gets them (last)."""
    norm = Normalizer([0.5] * split_channels(split), [0.25] * split_channels(split), torch.device("cpu"))
    kwargs = dict(normalizer=norm, device=torch.device("cpu"), shuffle=True, seed=4, drop_last=True,
                  augmentation=Augmentation(1, True, 0.5))
    local = batch_size // world_size
    ranks = [list(batches(split, batch_size, shard=slice(r * local, (r + 1) * local), **kwargs))
             for r in range(world_size)]
    return [*ranks, list(batches(split, batch_size, **kwargs))]


def split_channels(split) -> int:
    return split.images.shape[1] if isinstance(split, TensorSplit) else split.dataset[0][0].shape[0]


def assert_shares_make_the_batches(split, world_size: int) -> None:
    *ranks, whole = shares_of(split, world_size)
    assert len(whole) == len(split) // 6 and all(len(r) == len(whole) for r in ranks)
    for i, (x, y) in enumerate(whole):  # the ranks' shares, in rank order, are the one-process batch
        assert torch.equal(torch.cat([r[i][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[i][1] for r in ranks]), y)


def test_ranks_shares_of_in_memory_batches_are_the_one_process_batches():
    images, labels = make_images(40, 10, 8, 1, seed=0)
    split = TensorSplit(torch.from_numpy(images), torch.from_numpy(labels).long(), np.arange(40))
    for world_size in (2, 3):
        assert_shares_make_the_batches(split, world_size)


def test_ranks_shares_of_image_folder_batches_are_the_one_process_batches(tmp_path):
    rng = np.random.default_rng(2)
    for c in ("cat", "dog"):
        for i in range(10):
            _write_png(tmp_path / "train" / c / f"{i}.png", rng.integers(0, 256, (10, 10, 3), np.uint8))
            _write_png(tmp_path / "val" / c / f"{i}.png", rng.integers(0, 256, (10, 10, 3), np.uint8))
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, channels=3, val_size=2,
                                   workers=0))
    assert isinstance(data.train, FolderSplit)
    assert_shares_make_the_batches(data.train, 2)


def test_a_share_needs_whole_batches():
    images, labels = make_images(12, 10, 8, 1, seed=0)
    split = TensorSplit(torch.from_numpy(images), torch.from_numpy(labels).long(), np.arange(12))
    norm = Normalizer([0.5], [0.25], torch.device("cpu"))
    with pytest.raises(ValueError, match="needs drop_last"):
        next(batches(split, 6, normalizer=norm, device=torch.device("cpu"), shard=slice(0, 3)))
    with pytest.raises(ValueError, match="does not fit a batch of 6"):
        augment(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), 1, True, torch.Generator(), share=(3, 6))


@pytest.mark.real_data
def test_real_fashion_mnist():
    root = real_fashion_mnist_or_fail()
    data = load_dataset(DataConfig(dataset="fashion-mnist", root=str(root), val_size=5000))
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.train.images.shape[1:] == (1, 28, 28)
    assert not set(data.train.ids) & set(data.val.ids)
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.mean[0] == pytest.approx(0.286, abs=0.002) and data.std[0] == pytest.approx(0.353, abs=0.002)
