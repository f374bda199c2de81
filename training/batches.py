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
            erasing: float = 0.0) -> torch.Tensor:
    """Random crop with zero padding, random horizontal flip and random erasing, per sample, on uint8 tensors on
    any device."""
    n, _, h, w = images.shape
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device)
        dy, dx = dy.to(images.device), dx.to(images.device)
        rows = (torch.arange(h, device=images.device)[None, :] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=images.device)[None, :] + dx[:, None])[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator, device=generator.device).to(images.device) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    if erasing > 0:
        images = random_erase(images, erasing, generator)
    return images


def random_erase(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability p a sample gets a rectangle of 2-40% of its area, aspect
    ratio 0.3-3.3, filled with random pixel values."""
    n, c, h, w = images.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)).to(images.device)

    area = uniform(0.02, 0.4) * h * w
    aspect = torch.exp(uniform(float(np.log(0.3)), float(np.log(1 / 0.3))))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (uniform(0, 1) * (h - eh + 1)).floor().long()
    left = (uniform(0, 1) * (w - ew + 1)).floor().long()
    chosen = uniform(0, 1) < p
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    inside = (((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + ew)[:, None]))[:, None, :] & chosen[:, None, None])
    noise = torch.randint(0, 256, images.shape, generator=generator, device=generator.device,
                          dtype=torch.uint8).to(images.device)
    return torch.where(inside[:, None], noise, images)


class Normalizer:
    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def batches(split: Split, batch_size: int, *, normalizer: Normalizer, device: torch.device,
            shuffle: bool = False, seed: int = 0, augmentation: Augmentation | None = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float images, labels) on `device`, augmented when `augmentation` is given."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # On CUDA the augmentation draws on the device: CPU draws copied up from pageable memory block the host on
    # every batch until the GPU has drained, so no step's launches overlap the previous step's kernels. On the CPU
    # one generator serves the order and the augmentation (the streams of earlier runs, which resume relies on).
    aug_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    n = len(split)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    if isinstance(split, TensorSplit):
        order = order.to(split.images.device)
        chunks = ((split.images[idx], split.labels[idx]) for idx in
                  (order[i:i + batch_size] for i in range(0, stop, batch_size)))
    else:
        subset = torch.utils.data.Subset(split.dataset, split.ids[order.numpy()[:stop]].tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=split.workers,
                                             pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        chunks = ((x, torch.as_tensor(y)) for x, y in loader)
    for images, labels in chunks:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if augmentation is not None:
            images = augment(images, augmentation.padding, augmentation.flip, aug_gen, augmentation.erasing)
        yield normalizer(images), labels
