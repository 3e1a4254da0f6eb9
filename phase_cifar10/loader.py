"""Whole splits held on the training device as uint8, augmented a whole epoch at a time."""

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4


def epoch_generator(seed, epoch):
    """The one source of batch order and augmentation for an epoch: a function of (seed, epoch)
    only, so every arm sees identical batches whatever else has consumed randomness."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def crop_and_flip(images, shifts, flips, padding=CROP_PADDING):
    """Random 32x32 crops of zero-padded images, then horizontal flips, for a whole batch at once.

    images (B, C, H, W) uint8; shifts (B, 2) crop offsets into the padded image, in
    [0, 2*padding]; flips (B,) bool. One gather, no per-image Python.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = shifts[:, :1] + torch.arange(h, device=images.device)  # (B, H)
    cols = shifts[:, 1:] + torch.arange(w, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    batch_idx = torch.arange(b, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceSplit:
    """One split held on the training device as uint8, served as normalized float batches."""

    def __init__(self, images, labels, device, memory_format=torch.channels_last):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
        self.memory_format = memory_format

    def __len__(self):
        return len(self.labels)

    def normalize(self, images):
        x = (images.float() / 255 - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def train_batches(self, batch_size, seed, epoch):
        """Shuffled, augmented batches; the last one may be smaller (nothing is dropped).

        The whole epoch is shuffled, cropped, flipped and normalized at once, so a batch is a slice:
        no kernel of its own."""
        n, g = len(self), epoch_generator(seed, epoch)
        # Drawn on the CPU so that batches are the same on every device type.
        order = torch.randperm(n, generator=g)
        shifts = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        device = self.images.device
        order, shifts, flips = order.to(device), shifts.to(device), flips.to(device)
        images, labels = self.normalize(crop_and_flip(self.images[order], shifts, flips)), self.labels[order]
        for start in range(0, n, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]

    def eval_batches(self, batch_size):
        images = self.normalize(self.images)  # elementwise: the same numbers as batch by batch
        for start in range(0, len(self), batch_size):
            yield images[start : start + batch_size], self.labels[start : start + batch_size]
