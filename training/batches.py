"""Training batches from a split (training/data.py), either kind: shuffled with a seed, moved to the device,
augmented on uint8 tensors there (random crop with padding, horizontal flip, random erasing) and normalised. Small
datasets are augmented as whole tensors, since a DataLoader would be the bottleneck at 30k+ images/s; ImageFolder
batches come from a DataLoader and then take the same path, so there is one augmentation code path.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from .data import Split, TensorSplit


class Augmentation(NamedTuple):
    padding: int  # random crop after zero padding by this many pixels
    flip: bool  # random horizontal flip
    erasing: float = 0.0  # probability of random erasing

    @classmethod
    def of(cls, cfg) -> Augmentation:
        """A TrainConfig's augmentation."""
        return cls(cfg.crop_padding, cfg.flip, cfg.random_erasing)


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
            erasing: float = 0.0, share: tuple[int, int] | None = None) -> torch.Tensor:
    """Random crop with zero padding, random horizontal flip and random erasing, per sample, on uint8 tensors on
    any device. share (first row, rows in all): these images are those rows of a larger batch (a rank's share of a
    global batch); the random draws are the whole batch's, so each image gets what it gets when the batch is
    augmented whole, in one process."""
    n, _, h, w = images.shape
    first, total = share if share is not None else (0, n)
    if not 0 <= first <= total - n:
        raise ValueError(f"a share of {n} images from row {first} does not fit a batch of {total}")
    rows = slice(first, first + n)

    def draw(tensor: torch.Tensor) -> torch.Tensor:  # this share's rows of a draw for the whole batch
        return tensor[rows].to(images.device)

    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = draw(torch.randint(0, 2 * padding + 1, (total,), generator=generator, device=generator.device))
        dx = draw(torch.randint(0, 2 * padding + 1, (total,), generator=generator, device=generator.device))
        rows_i = (torch.arange(h, device=images.device)[None, :] + dy[:, None])[:, None, :, None]
        cols_i = (torch.arange(w, device=images.device)[None, :] + dx[:, None])[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows_i, cols_i]
    if flip:
        mask = draw(torch.rand(total, generator=generator, device=generator.device)) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    if erasing > 0:
        images = random_erase(images, erasing, generator, (first, total))
    return images


def random_erase(images: torch.Tensor, p: float, generator: torch.Generator,
                 share: tuple[int, int] | None = None) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability p a sample gets a rectangle of 2-40% of its area, aspect
    ratio 0.3-3.3, filled with random pixel values. share: as augment's."""
    n, c, h, w = images.shape
    first, total = share if share is not None else (0, n)
    rows = slice(first, first + n)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(total, generator=generator, device=generator.device))[rows].to(
            images.device)

    area = uniform(0.02, 0.4) * h * w
    aspect = torch.exp(uniform(float(np.log(0.3)), float(np.log(1 / 0.3))))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (uniform(0, 1) * (h - eh + 1)).floor().long()
    left = (uniform(0, 1) * (w - ew + 1)).floor().long()
    chosen = uniform(0, 1) < p
    rows_i = torch.arange(h, device=images.device)[None, :]
    cols_i = torch.arange(w, device=images.device)[None, :]
    inside = (((rows_i >= top[:, None]) & (rows_i < (top + eh)[:, None]))[:, :, None]
              & ((cols_i >= left[:, None]) & (cols_i < (left + ew)[:, None]))[:, None, :] & chosen[:, None, None])
    noise = torch.randint(0, 256, (total, c, h, w), generator=generator, device=generator.device,
                          dtype=torch.uint8)[rows].to(images.device)
    return torch.where(inside[:, None], noise, images)


class Normalizer:
    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def batches(split: Split, batch_size: int, *, normalizer: Normalizer, device: torch.device,
            shuffle: bool = False, seed: int = 0, augmentation: Augmentation | None = None,
            drop_last: bool = False, shard: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float images, labels) on `device`, augmented when `augmentation` is given.
    shard: this process's rows of every batch (a rank's share, World.shard; drop_last batches only): the order and
    the augmentations are those of the whole batches, so the ranks' shares together are the one-process batches."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # On CUDA the augmentation draws on the device: CPU draws copied up from pageable memory block the host on
    # every batch until the GPU has drained, so no step's launches overlap the previous step's kernels. On the CPU
    # one generator serves the order and the augmentation (the streams of earlier runs, which resume relies on).
    aug_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    n = len(split)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    if shard is not None and (not drop_last or shard.stop > batch_size):
        raise ValueError(f"a shard ({shard.start}:{shard.stop}) of batches of {batch_size} needs drop_last")
    rows = shard or slice(0, batch_size)
    if isinstance(split, TensorSplit):
        order = order.to(split.images.device)
        chunks = ((split.images[idx], split.labels[idx]) for idx in
                  (order[i:i + batch_size][rows] for i in range(0, stop, batch_size)))
    else:  # only this process's rows are read
        ids = order.numpy()[:stop]
        if shard is not None:
            ids = ids.reshape(-1, batch_size)[:, rows].reshape(-1)
        subset = torch.utils.data.Subset(split.dataset, split.ids[ids].tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=rows.stop - rows.start if shard else batch_size,
                                             num_workers=split.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        chunks = ((x, torch.as_tensor(y)) for x, y in loader)
    for images, labels in chunks:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if augmentation is not None:
            share = None if shard is None else (shard.start, batch_size)
            images = augment(images, augmentation.padding, augmentation.flip, aug_gen, augmentation.erasing, share)
        yield normalizer(images), labels
