"""Hyperparameters, the shared base schedule and the narrow CIFAR ResNet that every arm trains."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Training, shared by every arm.
EPOCHS = 30
WARMUP_EPOCHS = 2
BASE_LR = 0.01
BATCH_SIZE = 128
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WIDTH = 32  # channels of the first stage; 696,618 parameters at 32
# Evaluation batches: accelerators want large ones; CPU convolutions ran 1.2-1.8x faster at 128
# than at 1000 on a 2-core machine (cache-sized batches).
EVAL_BATCH_SIZE = 1000
EVAL_BATCH_SIZE_CPU = 128


def base_lr_at(epoch, base_lr=BASE_LR, warmup_epochs=WARMUP_EPOCHS, epochs=EPOCHS):
    """The shared schedule, constant within an epoch: linear warmup, then cosine to the end."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The narrow CIFAR ResNet: a stem, three stages of two BasicBlocks (w, 2w, 4w), a linear head."""

    def __init__(self, width=WIDTH, num_classes=10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(w, w, 1), BasicBlock(w, w, 1),
            BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w, 1),
            BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w, 1),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        # mean over H, W rather than adaptive pooling: its CUDA backward is not deterministic.
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def parameter_count(width, num_classes=10):
    """The number of trained parameters of the model at this width, counted without building it
    (a width too large for memory is refused with this count before anything is allocated)."""

    def block(c_in, c_out, shortcut):  # two 3x3 convolutions, their batch norms, a 1x1 shortcut
        return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out + (c_in * c_out + 2 * c_out if shortcut else 0)

    w = width
    stem = 27 * w + 2 * w
    stages = 2 * block(w, w, False) + block(w, 2 * w, True) + block(2 * w, 2 * w, False)
    stages += block(2 * w, 4 * w, True) + block(4 * w, 4 * w, False)
    return stem + stages + 4 * w * num_classes + num_classes


def memory_format_for(device, width):
    """channels_last (faster), except on CPUs at narrow widths.

    oneDNN's CPU kernel for the weight gradient of a 1x1 stride-2 convolution on channels_last
    input with fewer input channels than its block (8 with AVX2, 16 with AVX-512) hangs, crashes
    or returns wrong gradients (uxlfoundation/oneDNN#6035; reproduced with torch 2.13 and 2.14 at
    widths 2-6). The shortcut convolutions here have width and 2*width inputs.
    """
    if device.type == "cpu" and width < 16:
        return torch.contiguous_format
    return torch.channels_last


def build_model(width, seed, device):
    """The same initial weights for every arm of a seed."""
    torch.manual_seed(seed)
    return CifarResNet(width).to(device, memory_format=memory_format_for(device, width))
