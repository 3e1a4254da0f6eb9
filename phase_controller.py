"""Phase-aware learning-rate control on CIFAR-10, in one file.

A PhaseController watches dL, the smoothed per-epoch change of the training loss, and walks
through four phases -- explore, boundary, axis lock, polish. Each phase multiplies the
learning rate of a shared warmup+cosine schedule and sets the gradient accumulation (the
effective batch). For every seed this file trains a narrow CIFAR ResNet from identical
weights on identical batches twice: a baseline arm on the schedule alone and a phase-aware
arm whose only difference is the controller (optionally a third, LR-matched control arm).

Evidence: README.md, "Results" and "What has been measured": every number there names the
machine, the data and the command that produced it.

The file reads mechanism first, then the experiment around it in the order data flows:
    hyperparameters -> the mechanism (base schedule, dL, phase table, PhaseController,
    PhaseScheduler) -> network -> data (safe CIFAR-10 reading, synthetic task, splits) ->
    device-resident loader -> training (one loop serves every arm) -> statistics, summary and
    success criteria -> figures -> replay -> runs and the command line

PhaseController and PhaseScheduler lift into any PyTorch loop: see README.md, "Using
PhaseController in your own loop".

    python phase_controller.py                  # seed 42, baseline vs phase-aware, 30 epochs
    python phase_controller.py --multi-seed     # seeds 42,137,2024 plus a paired summary
    python phase_controller.py --dataset synthetic --subset 512 --width 8 --epochs 6
"""

import argparse
import copy
import csv
import functools
import json
import math
import os
import pickle
import random
import re
import shlex
import signal
import socket
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    import fcntl  # seed locks; absent on Windows
except ImportError:
    fcntl = None

#############################################
#              Hyperparameters              #
#############################################

# Training, shared by every arm.
EPOCHS = 30
WARMUP_EPOCHS = 2
BASE_LR = 0.01
BATCH_SIZE = 128
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WIDTH = 32  # channels of the first stage; 696,618 parameters at 32
# Evaluation batches: accelerators want large ones; CPU convolutions ran 1.2-1.8x faster at 128
# than at 1000 on the 2-core machine this was built on (cache-sized batches).
EVAL_BATCH_SIZE = 1000
EVAL_BATCH_SIZE_CPU = 128

# The phase controller (PhaseController's defaults and the CLI's).
S1_THRESHOLD = -0.02  # dL below this (loss falling fast) ends exploration
S2_THRESHOLD = 0.005  # |dL| below this (loss flat) locks the axis
LR_PULSE = 1.10  # LR multiplier while in S1_BOUNDARY
GRAD_ACCUM = 2  # micro-batches per optimizer step in S2 and S3
S3_PATIENCE = 5  # evaluations without improvement in S2 before S3
DL_WINDOW = 3  # first differences averaged into dL
DL_MODE = "absolute"  # dL in loss units per epoch; "relative": divided by the latest loss
EVAL_MIN_DELTA = 1e-4  # an eval loss must beat the best by this much to count as progress

# Runs.
SEED = 42
SEEDS = "42,137,2024"
OUTPUT_DIR = "results"
DATA_DIR = "data"

# Data.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4
SPLIT_SEED = 0  # the one permutation behind --subset and --val-size, the same for every --seed

# The settings that define what a seed's run computes: runs that agree on these and the seed
# compute the same numbers (on the same machine), so these are what --resume and --summarize compare.
RUN_KEYS = (
    "dataset", "subset", "val_size", "epochs", "warmup_epochs", "base_lr", "batch_size",
    "width", "momentum", "weight_decay", "precision", "control", "s1_threshold",
    "s2_threshold", "lr_pulse", "grad_accum", "s3_patience", "dl_window", "dl_mode",
)  # fmt: skip
# Settings added after results files were first written, and what runs before them used.
RUN_KEY_DEFAULTS = {"dl_mode": "absolute"}


#############################################
#      Mechanism: schedule, dL, phases      #
#############################################

# What the mechanism is, in the order it acts: the shared base schedule gives each epoch's LR;
# dL, the smoothed slope of the training loss, is what the controller watches; the phase table
# says what each phase asks of the next epoch; PhaseController walks the phases; PhaseScheduler
# puts its multiplier on top of any torch LR scheduler. Everything after this section is the
# experiment around it.


def base_lr_at(epoch, base_lr=BASE_LR, warmup_epochs=WARMUP_EPOCHS, epochs=EPOCHS):
    """The shared schedule, constant within an epoch: linear warmup, then cosine to the end."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def loss_slope(losses, dl_window=DL_WINDOW, dl_mode=DL_MODE):
    """dL: the mean of the last min(dl_window, n-1) first differences of a loss curve; 0 before
    two losses. dl_mode "relative" divides it by the latest loss."""
    n = len(losses)
    if n < 2:
        return 0.0
    w = min(dl_window, n - 1)
    slope = (losses[-1] - losses[-1 - w]) / w
    return slope / losses[-1] if dl_mode == "relative" else slope


PHASES = ("S0_EXPLORE", "S1_BOUNDARY", "S2_AXIS_LOCK", "S3_POLISH")
S0_EXPLORE, S1_BOUNDARY, S2_AXIS_LOCK, S3_POLISH = PHASES


class Recommendation(NamedTuple):
    """What a phase asks of the next epoch."""

    lr_mult: float  # multiplies the base schedule's LR; never compounds
    accumulation: int  # micro-batches per optimizer step


def phase_table(lr_pulse=LR_PULSE, grad_accum=GRAD_ACCUM):
    """The one phase -> Recommendation table."""
    return {
        S0_EXPLORE: Recommendation(lr_mult=1.0, accumulation=1),
        S1_BOUNDARY: Recommendation(lr_mult=lr_pulse, accumulation=1),
        S2_AXIS_LOCK: Recommendation(lr_mult=0.5, accumulation=grad_accum),
        S3_POLISH: Recommendation(lr_mult=0.1, accumulation=grad_accum),
    }


class PhaseController:
    """Detects training phases from the per-epoch training loss and recommends LR and accumulation.

    Call observe(train_loss, eval_loss) once per epoch; it returns the Recommendation for the
    next epoch, from phase_table(). At most one transition per call, decided by the phase held
    when the call starts:

        S0_EXPLORE   -> S1_BOUNDARY   when at least 3 losses are seen and dL < s1_threshold
        S1_BOUNDARY  -> S2_AXIS_LOCK  when |dL| < s2_threshold
        S2_AXIS_LOCK -> S3_POLISH     after s3_patience eval losses in S2 (not counting the call
                                      that entered it) without beating the best by 1e-4
        S3_POLISH is final.

    dl_mode="absolute" (the original) takes dL in loss units per epoch, so the thresholds mean
    different things at a loss of 2.0 and of 0.05; dl_mode="relative" divides dL by the latest
    training loss, so the thresholds are fractions of the loss per epoch and transfer between
    tasks and loss scales. grad_accum is the accumulation S2 and S3 ask for.

    Like torch's ReduceLROnPlateau, all state (settings and counters) is in state_dict().
    """

    def __init__(
        self,
        s1_threshold=S1_THRESHOLD,
        s2_threshold=S2_THRESHOLD,
        lr_pulse=LR_PULSE,
        grad_accum=GRAD_ACCUM,
        s3_patience=S3_PATIENCE,
        dl_window=DL_WINDOW,
        dl_mode=DL_MODE,
    ):
        if dl_mode not in ("absolute", "relative"):
            raise ValueError(f"dl_mode must be 'absolute' or 'relative', got {dl_mode!r}")
        for name, value in (("s1_threshold", s1_threshold), ("s2_threshold", s2_threshold), ("lr_pulse", lr_pulse)):
            require_number(name, value)
        if not math.isfinite(s1_threshold):
            raise ValueError(f"s1_threshold must be finite, got {s1_threshold}")
        if not s2_threshold >= 0 or not math.isfinite(s2_threshold):
            raise ValueError(f"s2_threshold must be >= 0, got {s2_threshold}")
        if not lr_pulse > 0 or not math.isfinite(lr_pulse):
            raise ValueError(f"lr_pulse must be > 0, got {lr_pulse}")
        for name, value in (("grad_accum", grad_accum), ("s3_patience", s3_patience), ("dl_window", dl_window)):
            if require_number(name, value) != value or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value}")
        self.s1_threshold = float(s1_threshold)
        self.s2_threshold = float(s2_threshold)
        self.lr_pulse = float(lr_pulse)
        self.grad_accum = int(grad_accum)
        self.s3_patience = int(s3_patience)
        self.dl_window = int(dl_window)
        self.dl_mode = dl_mode
        self.losses = []  # every training loss observed
        self.dL = 0.0
        self.phase = S0_EXPLORE
        self.best_eval = math.inf  # best eval loss seen in S2
        self.stale = 0  # evaluations in S2 since the best improved
        self.transitions = []  # human-readable, one line per transition
        self.transition_epochs = {}  # {"S1": epoch, ...}, the 0-based epoch that caused it

    def __repr__(self):
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in CONTROLLER_SETTINGS)
        return f"PhaseController(phase={self.phase}, dL={self.dL:+.5f}, epochs_seen={len(self.losses)}, {settings})"

    def recommendation(self):
        """What the current phase asks of the next epoch."""
        return phase_table(self.lr_pulse, self.grad_accum)[self.phase]

    def observe(self, train_loss, eval_loss=None):
        """Take one epoch's mean training loss (and eval loss); return the next epoch's Recommendation."""
        train_loss = require_number("train_loss", train_loss)
        if not math.isfinite(train_loss):
            raise ValueError(f"train_loss must be finite, got {train_loss}")
        if eval_loss is not None and not math.isfinite(require_number("eval_loss", eval_loss)):
            raise ValueError(f"eval_loss must be finite or None, got {eval_loss}")
        if self.dl_mode == "relative" and not train_loss > 0:
            raise ValueError(f"a relative dL needs positive training losses, got {train_loss}")
        self.losses.append(train_loss)
        self.dL = loss_slope(self.losses, self.dl_window, self.dl_mode)
        if self.phase == S0_EXPLORE and len(self.losses) >= 3 and self.dL < self.s1_threshold:
            self._enter(S1_BOUNDARY, f"dL {self.dL:+.4f} < s1_threshold {self.s1_threshold:+.4f}")
        elif self.phase == S1_BOUNDARY and abs(self.dL) < self.s2_threshold:
            self._enter(S2_AXIS_LOCK, f"|dL| {abs(self.dL):.4f} < s2_threshold {self.s2_threshold:.4f}")
        elif self.phase == S2_AXIS_LOCK and eval_loss is not None:
            if eval_loss < self.best_eval - EVAL_MIN_DELTA:
                self.best_eval, self.stale = float(eval_loss), 0
            else:
                self.stale += 1
            if self.stale >= self.s3_patience:
                self._enter(S3_POLISH, f"eval loss not below {self.best_eval:.4f} for {self.stale} evaluations")
        return self.recommendation()

    def _enter(self, phase, reason):
        epoch = len(self.losses) - 1
        self.transitions.append(f"epoch {epoch}: {self.phase} -> {phase} ({reason})")
        self.transition_epochs[phase[:2]] = epoch
        self.phase = phase

    def state_dict(self):
        return copy.deepcopy(self.__dict__)

    def load_state_dict(self, state_dict):
        state_dict = {RENAMED_CONTROLLER_KEYS.get(k, k): v for k, v in state_dict.items()}
        missing = set(self.__dict__) - set(state_dict)
        if missing:
            raise KeyError(f"PhaseController state_dict lacks {sorted(missing)}")
        self.__dict__.update(copy.deepcopy(state_dict))


class PhaseScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A PhaseController's LR multiplier on top of any torch LR scheduler, never compounding.

        scheduler = PhaseScheduler(optimizer, PhaseController(), base=OneCycleLR(optimizer, ...))
        for epoch in range(epochs):
            for batch in batches:
                ...                       # forward, backward, optimizer.step() every accumulation batches
                scheduler.step()          # wherever you would step `base`: per batch or per epoch
            lr_mult, accumulation = scheduler.observe(train_loss, eval_loss)

    After every call each param group's LR is the base scheduler's own, unscaled LR for that group
    times the current multiplier: before each base step the unscaled LRs are put back, so
    recursive schedulers (MultiStepLR, ExponentialLR) compute from their own values and
    closed-form ones (LambdaLR, OneCycleLR) are not overwritten. base=None keeps the optimizer's
    LRs at construction as a constant base. Without a controller the multiplier stays lr_mult and
    observe() returns that fixed Recommendation(lr_mult, 1).

    It is a torch LRScheduler, so frameworks that check for one (PyTorch Lightning) accept it, and
    the inherited names keep torch's meaning: base_lrs are the LRs at construction (initial_lr),
    last_epoch counts step() calls, get_last_lr() the LRs applied now. Constructing it sets the
    multiplier on the optimizer's LRs and steps nothing, unlike torch's own schedulers.

    Accumulation: with a per-batch base schedule, call step() after every micro-batch, also those
    that end in no optimizer step. The base schedule then advances with the data seen, whatever
    accumulation the controller recommends, and ends where it would without accumulation; each
    optimizer step uses the LR in force at its last micro-batch. (Stepping only with the
    optimizer would stretch the schedule by the accumulation: it would not reach its end in time.)
    """

    def __init__(self, optimizer, controller=None, base=None, lr_mult=1.0):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if controller is not None and not isinstance(controller, PhaseController):
            raise TypeError(f"controller must be a PhaseController or None, got {type(controller).__name__}")
        if base is not None and not callable(getattr(base, "step", None)):
            raise TypeError(f"base must be a torch LR scheduler (with step()) or None, got {type(base).__name__}")
        if controller is None and not (require_number("lr_mult", lr_mult) > 0 and math.isfinite(lr_mult)):
            raise ValueError(f"lr_mult must be > 0, got {lr_mult}")
        # Not LRScheduler.__init__: it would take a step at construction.
        self.optimizer, self.controller, self.base = optimizer, controller, base
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.last_epoch, self._step_count = 0, 1  # as torch's schedulers leave them after construction
        self.fixed = Recommendation(float(lr_mult), 1)  # what observe() returns without a controller
        self.lr_mult, self.accumulation = controller.recommendation() if controller is not None else self.fixed
        self.unscaled_lrs = [group["lr"] for group in optimizer.param_groups]  # the base scheduler's own
        self._apply()

    def __repr__(self):
        base = "constant" if self.base is None else type(self.base).__name__
        phase = None if self.controller is None else self.controller.phase
        return (
            f"PhaseScheduler(phase={phase}, lr_mult={self.lr_mult}, accumulation={self.accumulation}, "
            f"last_lr={self.get_last_lr()}, base={base}, controller={self.controller!r})"
        )

    def _apply(self, lr_mult=None):
        """Each group's LR: its unscaled LR times lr_mult (the current multiplier when None)."""
        lr_mult = self.lr_mult if lr_mult is None else lr_mult
        for group, unscaled in zip(self.optimizer.param_groups, self.unscaled_lrs, strict=True):
            group["lr"] = unscaled * lr_mult
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, *args, **kwargs):
        """Advance the base scheduler (arguments pass through, e.g. ReduceLROnPlateau's metric)."""
        if self.base is not None:
            self._apply(1.0)  # the base steps from its own, unscaled LRs
            self.base.step(*args, **kwargs)
            self.unscaled_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.last_epoch += 1
        self._step_count += 1
        self._apply()

    def observe(self, train_loss, eval_loss=None):
        """One epoch's losses to the controller; its multiplier applies from the next optimizer step."""
        if self.controller is None:
            return self.fixed
        recommendation = self.controller.observe(train_loss, eval_loss)
        self.lr_mult, self.accumulation = recommendation
        self._apply()
        return recommendation

    def get_lr(self):
        """The LRs in force: the base's unscaled LRs times the current multiplier."""
        return [unscaled * self.lr_mult for unscaled in self.unscaled_lrs]

    def get_last_lr(self):
        """The LRs applied now, one per param group (the base's times the multiplier)."""
        return list(self._last_lr)

    def state_dict(self):
        return {
            "base": None if self.base is None else self.base.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "lr_mult": self.lr_mult,
            "accumulation": self.accumulation,
            "unscaled_lrs": list(self.unscaled_lrs),
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state_dict):
        if self.base is not None:
            self.base.load_state_dict(state_dict["base"])
        if self.controller is not None:
            self.controller.load_state_dict(state_dict["controller"])
        self.lr_mult = state_dict["lr_mult"]
        self.accumulation = state_dict["accumulation" if "accumulation" in state_dict else "grad_accum"]
        if "unscaled_lrs" in state_dict:
            self.unscaled_lrs = list(state_dict["unscaled_lrs"])
            self.base_lrs, self.last_epoch = list(state_dict["base_lrs"]), state_dict["last_epoch"]
        else:  # saved before this was an LRScheduler: "base_lrs" held the unscaled LRs
            self.unscaled_lrs = list(state_dict["base_lrs"])
            self.last_epoch = self.base.last_epoch if self.base is not None else 0
        self._step_count = self.last_epoch + 1
        self._apply()


# The controller's settings: its keywords, the results file's config keys and the flags' names.
CONTROLLER_SETTINGS = ("s1_threshold", "s2_threshold", "lr_pulse", "grad_accum", "s3_patience", "dl_window", "dl_mode")
RENAMED_CONTROLLER_KEYS = {"window": "dl_window", "slope": "dl_mode"}  # in state_dicts saved before 2026-12


def controller_from_config(config):
    return PhaseController(**{key: config[key] for key in CONTROLLER_SETTINGS})


def require_number(name, value):
    """value as a float: a Python, numpy or one-element torch number, never a bool or a string."""
    if not isinstance(value, bool | np.bool_ | str | bytes | None):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a number, got {value!r}")


#############################################
#                  Network                  #
#############################################


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


def build_model(width, seed, device):
    """The same initial weights for every arm of a seed."""
    torch.manual_seed(seed)
    return CifarResNet(width).to(device, memory_format=memory_format_for(device, width))


#############################################
#              Files and errors             #
#############################################


class UserError(Exception):
    """A problem the user can fix (arguments, data, files): reported in one line, exit 2."""


def write_atomically(path, write):
    """write(tmp_path) then rename over path, so no reader ever sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")

    write_atomically(path, write)


def make_folder(path, flag):
    """mkdir -p path, or one line naming the flag that asked for it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created ({e.strerror or e})") from None
    return path


@contextmanager
def new_folders_removed_on_failure(path, flag):
    """mkdir -p path; if the block then fails, remove again the (empty) folders this made, so a
    start that fails leaves nothing behind."""
    path = Path(path)
    made = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    make_folder(path, flag)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


#############################################
#           Data: CIFAR-10 on disk          #
#############################################

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_CASES_PER_BATCH = 10000


# The official batch files are Python 2 pickles of dicts holding lists, strings and one numpy
# array. An ordinary unpickler would run whatever a tampered file names, so this one resolves
# only what those files need: numpy's array reconstruction (under its numpy 1 and numpy 2
# module names) and dtypes. Everything else in them is plain pickle opcodes.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeCifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return _SAFE_GLOBALS[(module, name)]


def read_cifar_pickle(path):
    """One batch or meta file as a dict with str keys (files written with bytes keys too)."""
    try:
        with open(path, "rb") as f:
            obj = SafeCifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path}: file missing") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(path, count):
    """Images (count, 3, 32, 32) uint8 and labels (count,) int64 of one batch file, checked."""
    batch = read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (count, 3072):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' should be uint8 of shape ({count}, 3072), found {found}")
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: 'labels' should be {count} integers, found {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{path}: labels must lie in 0-9, found {labels.min()}..{labels.max()}")
    # Each row holds the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(count, 3, 32, 32), labels.astype(np.int64)


def read_cifar10(folder):
    """(train_x, train_y, test_x, test_y) from a cifar-10-batches-py folder, every file checked.

    Batch sizes are checked against the folder's own batches.meta, so a smaller folder in the
    same format (as the tests write) reads too; the full dataset has 10,000 per batch.
    """
    folder = Path(folder)
    meta = read_cifar_pickle(folder / "batches.meta")
    count, names = meta.get("num_cases_per_batch"), meta.get("label_names")
    if not isinstance(count, int) or count < 1:
        raise UserError(f"{folder / 'batches.meta'}: 'num_cases_per_batch' is {count!r}")
    if not isinstance(names, list) or len(names) != 10:
        raise UserError(f"{folder / 'batches.meta'}: 'label_names' should list 10 classes")
    train = [read_cifar_batch(folder / name, count) for name in CIFAR_TRAIN_FILES]
    test_x, test_y = read_cifar_batch(folder / "test_batch", count)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y


def download_cifar10_archive(dest_dir):
    """The official archive into dest_dir; torchvision's helper checks its MD5."""
    from torchvision.datasets.utils import download_url

    download_url(CIFAR_URL, str(dest_dir), CIFAR_ARCHIVE, CIFAR_ARCHIVE_MD5)
    return Path(dest_dir) / CIFAR_ARCHIVE


def md5_matches(path, md5):
    from torchvision.datasets.utils import check_integrity

    return check_integrity(str(path), md5)


def extract_cifar_archive(archive, dest_dir):
    # Only the dataset's own folder, and only plain files and folders inside it: an archive
    # from elsewhere cannot write outside dest_dir or plant links.
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m for m in tar.getmembers()
            if (m.isfile() or m.isdir()) and Path(m.name).parts[:1] == (CIFAR_FOLDER,)
            and ".." not in Path(m.name).parts
        ]  # fmt: skip
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest_dir, members=members, **extra)


def prepare_cifar10(data_dir):
    """The path of a valid cifar-10-batches-py folder in data_dir, unpacked or downloaded if needed.

    Unpacking and downloading happen in a hidden temporary folder that is renamed into place
    only after every file has been read and checked, so an interrupted download, a failed
    checksum or a broken archive leaves no half-written dataset behind.
    """
    data_dir = Path(data_dir)
    folder = data_dir / CIFAR_FOLDER
    if folder.is_dir():
        return folder
    how_to_fix = (
        f"put the official {CIFAR_ARCHIVE} into {data_dir}/ (or unpack it there as "
        f"{folder}/), or point --data-dir at the folder that holds {CIFAR_FOLDER}/"
    )
    with new_folders_removed_on_failure(data_dir, "--data-dir"):
        return unpack_or_download_cifar10(data_dir, folder, how_to_fix)


def unpack_or_download_cifar10(data_dir, folder, how_to_fix):
    archive = data_dir / CIFAR_ARCHIVE
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".cifar10-unpacking-") as tmp:
        if archive.exists():
            if not md5_matches(archive, CIFAR_ARCHIVE_MD5):
                raise UserError(
                    f"{archive}: MD5 differs from the official archive's; unpack it yourself "
                    f"as {folder}/ to use it anyway (its files are then read and checked)"
                )
            print(f"unpacking {archive}")
        else:
            print(f"CIFAR-10 not found in {data_dir}; downloading {CIFAR_URL}")
            previous_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(60)
            try:
                archive = download_cifar10_archive(tmp)
            except Exception as e:
                raise UserError(f"CIFAR-10 could not be downloaded ({e}); {how_to_fix}") from None
            finally:
                socket.setdefaulttimeout(previous_timeout)
        try:
            extract_cifar_archive(archive, tmp)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{archive}: cannot unpack ({e}); {how_to_fix}") from None
        read_cifar10(Path(tmp) / CIFAR_FOLDER)
        try:
            os.replace(Path(tmp) / CIFAR_FOLDER, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process (a Slurm task, say) put its folder in place first; it is read and
            # checked like any existing folder, and ours goes away with the temporary folder.
    return folder


#############################################
#    Data: synthetic task and the splits    #
#############################################


class Dataset(NamedTuple):
    train_x: np.ndarray  # (N, 3, 32, 32) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray


def synthetic_dataset(seed, n_train=2048, n_test=256):
    """A small learnable 10-class task of 32x32 images, made from the seed alone.

    Each class is a coarse random colour pattern; an image is its class pattern under heavy
    pixel noise, so a small network learns it gradually rather than in one step. For smoke
    runs and tests only: never reported as CIFAR-10.
    """
    rng = np.random.default_rng(seed)
    patterns = np.kron(rng.normal(size=(10, 3, 4, 4)), np.ones((8, 8)))  # (10, 3, 32, 32)

    def draw(n):
        labels = rng.integers(0, 10, size=n)
        pixels = 128 + 60 * patterns[labels] + rng.normal(0, 60, size=(n, 3, 32, 32))
        return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return Dataset(train_x, train_y, test_x, test_y)


def split_indices(n_train, subset, val_size):
    """(train, val) indices into the training split: val is the first val_size images of one
    fixed permutation, train the next `subset` (all the rest when subset is 0). Disjoint."""
    if val_size + max(subset, 1) > n_train:
        raise UserError(
            f"--val-size {val_size} and --subset {subset} need more than the {n_train} training images available"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    val, rest = order[:val_size], order[val_size:]
    return (rest[:subset] if subset else rest), val


#############################################
#       Loader: whole splits on device      #
#############################################


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


def memory_format_for(device, width):
    """channels_last (faster), except on CPUs at narrow widths.

    oneDNN's CPU kernel for the weight gradient of a 1x1 stride-2 convolution on channels_last
    input with fewer input channels than its block (8 with AVX2, 16 with AVX-512) hangs,
    crashes or returns wrong gradients (uxlfoundation/oneDNN#6035; reproduced here with torch
    2.13 and 2.14 at widths 2-6). The shortcut convolutions here have width and 2*width inputs.
    """
    if device.type == "cpu" and width < 16:
        return torch.contiguous_format
    return torch.channels_last


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

        The whole epoch is shuffled, cropped and flipped at once, so a batch costs one slice and
        its normalization, not a dozen small kernels."""
        n, g = len(self), epoch_generator(seed, epoch)
        # Drawn on the CPU so that batches are the same on every device type.
        order = torch.randperm(n, generator=g)
        shifts = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        device = self.images.device
        order, shifts, flips = order.to(device), shifts.to(device), flips.to(device)
        images, labels = crop_and_flip(self.images[order], shifts, flips), self.labels[order]
        for start in range(0, n, batch_size):
            yield self.normalize(images[start : start + batch_size]), labels[start : start + batch_size]

    def eval_batches(self, batch_size):
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield self.normalize(self.images[start:end]), self.labels[start:end]


#############################################
#       Training: one loop, every arm       #
#############################################


def native_bf16(device):
    """Whether the hardware computes bf16 natively; emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the argument: it reports native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def autocast_for(device, precision):
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def set_up_backends():
    """Deterministic kernels, and fp32 that is IEEE fp32 on every device.

    cuDNN convolutions use TF32 by default, so without this `--bf16 off` on a GPU would train in
    TF32 while recording fp32. The allow_tf32 flags exist in every torch from 2.4 on; torch 2.9's
    fp32_precision API is not touched, since mixing the two makes reading allow_tf32 raise.
    """
    # cuBLAS is deterministic only with this workspace setting, set before CUDA starts (lazily, at
    # the first CUDA tensor). Set by the command line, not on import: a library leaves its user's
    # environment alone.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def train_epoch(model, optimizer, batches, accumulation, autocast):
    """One pass over batches; returns (mean per-sample loss, accuracy %, optimizer steps), the sums
    read from the device once.

    With accumulation k the optimizer steps after every k micro-batches and after the last one of
    the epoch, so B micro-batches take ceil(B/k) steps. Every step uses the per-sample mean gradient
    over exactly the samples of its window: micro-batch losses are summed over samples and the
    window's gradient is divided by its sample count before the step. So a short last window (391
    batches with k=2) steps at full strength, and micro-batches of unequal size weigh by their size.
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_sum, correct, seen, steps, in_window, window_samples = 0.0, 0, 0, 0, 0, 0
    for images, labels in batches:
        with autocast:
            logits = model(images)
            loss = F.cross_entropy(logits, labels, reduction="sum")
        loss.backward()
        in_window, window_samples = in_window + 1, window_samples + len(labels)
        if in_window == accumulation:
            step_on_window_mean(optimizer, params, window_samples)
            steps, in_window, window_samples = steps + 1, 0, 0
        # Device-side running sums: no host sync per step.
        loss_sum = loss_sum + loss.detach().float()
        correct = correct + (logits.argmax(1) == labels).sum()
        seen += len(labels)
    if in_window:
        step_on_window_mean(optimizer, params, window_samples)
        steps += 1
    return float(loss_sum) / seen, 100.0 * float(correct) / seen, steps


def step_on_window_mean(optimizer, params, samples):
    """Turn the summed gradient of a window into its per-sample mean, step, and clear it."""
    torch._foreach_div_([p.grad for p in params if p.grad is not None], samples)  # one launch, not one per tensor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model, split, autocast):
    """(mean per-sample loss, accuracy %) over a whole split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    batch_size = EVAL_BATCH_SIZE_CPU if split.images.device.type == "cpu" else EVAL_BATCH_SIZE
    for images, labels in split.eval_batches(batch_size):
        with autocast:
            logits = model(images)
        loss_sum = loss_sum + F.cross_entropy(logits.float(), labels, reduction="sum")
        correct = correct + (logits.argmax(1) == labels).sum()
    return float(loss_sum) / len(split), 100.0 * float(correct) / len(split)


class Progress:
    """Epoch counts and an ETA over all the epochs this process still has to train."""

    def __init__(self, total_epochs):
        self.total, self.done, self.seconds = total_epochs, 0, 0.0

    def skip(self, epochs):  # epochs restored from a checkpoint, or never run (divergence)
        self.total -= epochs

    def tick(self, seconds):
        self.done += 1
        self.seconds += seconds
        left = max(self.total - self.done, 0) * self.seconds / self.done
        return f"{int(left // 60)}m{int(left % 60):02d}s"


@dataclass
class SeedRun:
    """Everything one seed's arms share."""

    seed: int
    config: dict  # the results file's config
    device: torch.device
    train: DeviceSplit
    test: DeviceSplit
    val: DeviceSplit | None  # with --val-size: drives the controller and best-epoch selection
    output_dir: Path
    resume: bool
    progress: Progress

    def checkpoint_path(self, arm):
        return self.output_dir / f"checkpoint_seed_{self.seed}_{arm}.pt"

    @property
    def autocast(self):
        return autocast_for(self.device, self.config["precision"])


ARMS = (BASELINE, PHASE_AWARE, CONTROL) = ("baseline", "phase_aware", "control")
METRICS = ("best_acc", "final_acc")


def run_arm(run, name, controller=None, lr_mult=1.0):
    """Train one arm of a seed; the controller (or a constant lr_mult) is all that differs between arms.

    After every epoch the whole state is checkpointed atomically, so --resume continues from the
    last completed epoch exactly as if never interrupted. A non-finite loss stops the arm.
    """
    model, optimizer, scheduler = build_arm(run, controller, lr_mult)
    arm, start = restore_arm(run, name, model, optimizer, scheduler) or (new_arm(controller, lr_mult), 0)
    epochs = run.config["epochs"]
    if arm["status"] != "ok":  # it diverged before an interruption: nothing left to train
        run.progress.skip(epochs - start)
        start = epochs
    for epoch in range(start, epochs):
        # The mechanism, one epoch: train at the multiplier and accumulation in force (the base
        # LR times lr_mult, accumulation micro-batches per step), observe the epoch's losses, and
        # the recommendation applies from the next epoch on. Arms without a controller observe too:
        # their recommendation is the fixed one.
        lr, lr_mult, accumulation = scheduler.get_last_lr()[0], scheduler.lr_mult, scheduler.accumulation
        row = train_and_evaluate(run, model, optimizer, name, epoch, accumulation)
        arm["time_seconds"] += row["train_seconds"] + row["eval_seconds"]
        if not stop_if_diverged(run, name, arm, epoch, row):
            scheduler.observe(row["train_loss"], row.get("val_loss", row["eval_loss"]))
            record_epoch(run, name, arm, epoch, row | {"lr": lr}, controller, lr_mult, accumulation)
        scheduler.step()  # the next epoch's base LR
        save_checkpoint(run, name, model, optimizer, scheduler, arm, epoch + 1)
        if arm["status"] != "ok":
            break
    return finish_arm(arm, controller, selected_by="val_acc" if run.val is not None else "eval_acc")


def build_arm(run, controller, lr_mult):
    """Model, optimizer and PhaseScheduler of an arm: the same initial weights for every arm of a seed."""
    model = build_model(run.config["width"], run.seed, run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    # The optimizer's LR is 1.0, so LambdaLR's factor is the LR itself: exactly base_lr_at.
    cfg = run.config
    base = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: base_lr_at(epoch, cfg["base_lr"], cfg["warmup_epochs"], cfg["epochs"])
    )
    return model, optimizer, PhaseScheduler(optimizer, controller, base=base, lr_mult=lr_mult)


def new_arm(controller, lr_mult):
    keys = ["train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "steps", "train_seconds", "eval_seconds"]
    arm = {"status": "ok", "time_seconds": 0.0}
    if controller is None:
        arm["lr_mult"] = lr_mult
    else:
        keys += ["phase", "dL", "lr_mult", "grad_accum"]
    arm["per_epoch"] = {key: [] for key in keys}
    return arm


def train_and_evaluate(run, model, optimizer, name, epoch, accumulation):
    """One epoch of training at the optimizer's LR, then evaluation: the epoch's row of per_epoch values."""
    t0 = time.perf_counter()
    batch_size = run.config["batch_size"]
    batches = run.train.train_batches(batch_size, run.seed, epoch)
    total = math.ceil(len(run.train) / batch_size)
    batches = show_batches(batches, total, f"seed {run.seed} {name:<11} epoch {epoch + 1:>3}/{run.config['epochs']}")
    row = {}
    row["train_loss"], row["train_acc"], row["steps"] = train_epoch(
        model, optimizer, batches, accumulation, run.autocast
    )
    t1 = time.perf_counter()
    if math.isfinite(row["train_loss"]):  # a diverged model is not worth evaluating
        row["eval_loss"], row["eval_acc"] = evaluate(model, run.test, run.autocast)
        if run.val is not None:
            row["val_loss"], row["val_acc"] = evaluate(model, run.val, run.autocast)
    row.update(train_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1)
    return row


def stop_if_diverged(run, name, arm, epoch, row):
    """Whether the epoch's losses are non-finite; if so the arm is marked diverged and stops."""
    diverged = [f"{k} {row[k]}" for k in ("train_loss", "eval_loss", "val_loss") if not math.isfinite(row.get(k, 0))]
    if diverged:
        arm.update(status="diverged", diverged_epoch=epoch, diverged_reason=", ".join(diverged))
        print(f"seed {run.seed} {name}: DIVERGED at epoch {epoch} ({arm['diverged_reason']}); arm stopped")
        run.progress.skip(run.config["epochs"] - epoch)
    return bool(diverged)


def record_epoch(run, name, arm, epoch, row, controller, lr_mult, accumulation):
    """The epoch's row into the arm's per_epoch lists, and its log line. The phase arm adds the
    multiplier and accumulation applied in the epoch, and its phase and dL after observing it."""
    if controller is not None:
        row.update(lr_mult=lr_mult, grad_accum=accumulation, phase=controller.phase, dL=controller.dL)
    for key, value in row.items():
        arm["per_epoch"].setdefault(key, []).append(value)
    log_epoch(run, name, epoch, row, run.progress.tick(row["train_seconds"] + row["eval_seconds"]))


def log_epoch(run, name, epoch, row, eta):
    line = (
        f"seed {run.seed} {name:<11} epoch {epoch + 1:>3}/{run.config['epochs']}"
        f"  train {row['train_loss']:.4f}  eval {row['eval_loss']:.4f}  acc {row['eval_acc']:6.2f}%"
    )
    if "val_acc" in row:
        line += f"  val {row['val_loss']:.4f} {row['val_acc']:6.2f}%"
    line += f"  lr {row['lr']:.5f}"
    if "phase" in row:
        line += f"  {row['phase']} accum {row['grad_accum']}"
    seconds = row["train_seconds"] + row["eval_seconds"]
    print(f"{line}  {seconds:.1f}s  ETA {eta}")


def show_batches(batches, total, label, stream=None):
    """The batches, unchanged. On a terminal one self-updating line shows batches done, images/s
    and the epoch's ETA while they are consumed; in a pipe or a log file nothing is added."""
    stream = stream or sys.stdout
    if not stream.isatty():
        yield from batches
        return
    start = last = time.perf_counter()
    images = 0
    for done, (x, y) in enumerate(batches, 1):
        yield x, y  # resumes once the batch is queued for training
        images += len(y)
        now = time.perf_counter()
        if now - last >= 0.5 or done == total:
            # An accelerator runs behind the host: wait until the batches counted are trained, so that
            # images/s is what was computed, not what was queued. Only when a line is drawn.
            if synchronize(y.device):
                now = time.perf_counter()
            eta = (total - done) * (now - start) / done
            stream.write(f"\r{label}  batch {done}/{total}  {images / (now - start):.0f} img/s  ETA {eta:.0f}s\033[K")
            stream.flush()
            last = now
    stream.write("\r\033[K")  # the epoch's own line takes its place


def synchronize(device):
    """Wait for the device's queued work; whether there was a queue to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return device.type in ("cuda", "mps")


def restore_arm(run, name, model, optimizer, scheduler):
    """(arm record, next epoch) from the arm's checkpoint when resuming; None when starting afresh."""
    path = run.checkpoint_path(name)
    if not (run.resume and path.exists()):
        return None
    state = torch.load(path, map_location=run.device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    run.progress.skip(state["next_epoch"])
    print(f"seed {run.seed} {name}: resumed after epoch {state['next_epoch'] - 1}")
    arm, log = state["arm"], state["arm"]["per_epoch"]
    if "steps" not in log:  # a checkpoint from before steps were recorded: the steps the loop took
        batches = math.ceil(len(run.train) / run.config["batch_size"])
        log["steps"] = [math.ceil(batches / k) for k in log.get("grad_accum", [1] * len(log["train_loss"]))]
    return arm, state["next_epoch"]


def save_checkpoint(run, name, model, optimizer, scheduler, arm, next_epoch):
    state = {
        "config": run.config,
        "next_epoch": next_epoch,
        "arm": arm,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),  # base schedule, controller and multiplier
    }
    write_atomically(run.checkpoint_path(name), lambda tmp: torch.save(state, tmp))


def finish_arm(arm, controller, selected_by):
    """Best and final test accuracy, and the phase arm's transitions. Best is the test accuracy at
    the epoch with the best selection metric: the test accuracy itself by default, validation
    accuracy with --val-size."""
    if controller is not None:
        arm["transitions"] = list(controller.transitions)
        arm["transition_epochs"] = dict(controller.transition_epochs)
    log = arm["per_epoch"]
    if log["eval_acc"]:
        best = int(np.argmax(log[selected_by]))  # the earliest epoch among ties
        arm.update(best_acc=log["eval_acc"][best], best_epoch=best, final_acc=log["eval_acc"][-1])
    else:
        arm.update(best_acc=None, best_epoch=None, final_acc=None)
    arm["selected_by"] = "validation" if selected_by == "val_acc" else "test"
    return arm


def matched_lr_mult(phase_arm, config):
    """The control's constant c, matched on the total first-order update (LR x optimizer steps).

    Over the epochs the phase arm completed, with base LR b_e, applied multiplier m_e and s_e
    optimizer steps actually taken (ceil(B/k_e) for B micro-batches at accumulation k_e: a short
    last window still steps), against the B steps per epoch of the control at accumulation 1:
        c = sum_e m_e * b_e * s_e / B  /  sum_e b_e
    so the control moves its weights as far in total as the phase arm did. The plain mean of m_e
    ignores that epochs carry very different base LRs and step counts.
    """
    log = phase_arm["per_epoch"]
    batches = math.ceil(config["train_size"] / config["batch_size"])
    base = [base_lr_at(e, config["base_lr"], config["warmup_epochs"], config["epochs"]) for e in range(len(log["lr"]))]
    update = sum(m * b * (s / batches) for m, b, s in zip(log["lr_mult"], base, log["steps"], strict=True))
    return update / sum(base)


def run_control(run, phase_arm):
    """The LR-matched control arm: the base schedule times one constant, accumulation 1.
    Not run when the phase arm diverged: its schedule, and so the constant, is incomplete."""
    if phase_arm["status"] != "ok":
        arm = new_arm(None, None)
        arm.update(status="not_run", reason=f"phase_aware {phase_arm['status']} at epoch {phase_arm['diverged_epoch']}")
        print(f"seed {run.seed} control: not run ({arm['reason']}; the matched constant needs its whole schedule)")
        run.progress.skip(run.config["epochs"])
        return finish_arm(arm, None, selected_by="eval_acc")
    return run_arm(run, CONTROL, lr_mult=matched_lr_mult(phase_arm, run.config))


def paired_delta(results, other, metric):
    """phase_aware minus other on metric, or None unless both arms finished healthy."""
    a, b = results[PHASE_AWARE], results[other]
    return a[metric] - b[metric] if a["status"] == b["status"] == "ok" else None


def run_seed(run):
    """All arms of one seed; writes figure_seed_N.png, then results_seed_N.json, then drops the checkpoints."""
    seed_everything(run.seed)
    cfg = run.config
    arms = {BASELINE: run_arm(run, BASELINE)}
    arms[PHASE_AWARE] = run_arm(run, PHASE_AWARE, controller=controller_from_config(cfg))
    arms[PHASE_AWARE]["mean_lr_mult"] = float(np.mean(arms[PHASE_AWARE]["per_epoch"]["lr_mult"] or [1.0]))
    if cfg["control"] == "lr-matched":
        arms[CONTROL] = run_control(run, arms[PHASE_AWARE])
    results = {"config": cfg, **arms}
    for other in [name for name in arms if name != PHASE_AWARE]:
        suffix = "" if other == BASELINE else f"_vs_{other}"
        for metric in METRICS:
            results[f"delta_{metric}{suffix}"] = paired_delta(results, other, metric)
    plot_seed(results, run.output_dir / f"figure_seed_{run.seed}.png")
    # Last: its existence means the seed is complete (--resume skips it, --summarize reads it).
    write_json(run.output_dir / f"results_seed_{run.seed}.json", results)
    for name in arms:
        run.checkpoint_path(name).unlink(missing_ok=True)
    print_seed_result(results)
    return results


def print_seed_result(results):
    seed = results["config"]["seed"]
    for name in ARMS:
        if name in results:
            arm = results[name]
            status = "" if arm["status"] == "ok" else f"  [{arm_problem(arm)}]"
            print(f"seed {seed} {name:<11} best {fmt_acc(arm['best_acc'])}  final {fmt_acc(arm['final_acc'])}{status}")
    if CONTROL in results and results[CONTROL]["status"] == "ok":
        print(
            f"seed {seed} control lr_mult {results[CONTROL]['lr_mult']:.4f} (matched on the total update;"
            f" the phase arm's plain mean multiplier is {results[PHASE_AWARE]['mean_lr_mult']:.4f})"
        )
    for other, suffix in ((BASELINE, ""), (CONTROL, "_vs_control")):
        if other in results:
            best, final = results[f"delta_best_acc{suffix}"], results[f"delta_final_acc{suffix}"]
            print(f"seed {seed} delta (phase_aware - {other}): best {fmt_acc(best, '+')}  final {fmt_acc(final, '+')}")
    for line in results[PHASE_AWARE].get("transitions", []):
        print(f"seed {seed} transition {line}")
    print_criteria(seed_criteria(results), prefix=f"seed {seed} ")


def fmt_acc(value, sign=""):
    return "n/a" if value is None else f"{value:{sign}.2f}%"


#############################################
#         Statistics and the summary        #
#############################################

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
EXACT_SIGN_FLIP_MAX_N = 16  # 2^16 sign patterns; beyond that a fixed-seed Monte Carlo sample


def bootstrap_ci(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[idx].mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]


def sign_flip_p_value(deltas):
    """Two-sided paired sign-flip permutation p-value of the mean delta.

    Under the null the sign of each seed's delta is a coin flip: p is the share of sign patterns
    whose |mean| is at least the observed |mean|. Exact (all 2^n patterns) for n <= 16.
    """
    d = np.asarray(deltas, dtype=float)
    n = len(d)
    exact = n <= EXACT_SIGN_FLIP_MAX_N
    if exact:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    else:
        bits = np.random.default_rng(BOOTSTRAP_SEED).integers(0, 2, size=(100_000, n))
    extreme = np.sum(np.abs(((1 - 2 * bits) * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    # A sampled p-value counts the observed pattern too, so that it is never 0.
    return float(extreme / len(bits)) if exact else float((extreme + 1) / (len(bits) + 1))


def paired_stats(deltas):
    """Statistics of per-seed deltas {seed: delta} (only seeds whose two arms both finished)."""
    d = np.asarray(list(deltas.values()), dtype=float)
    return {
        "per_seed": {str(seed): float(v) for seed, v in deltas.items()},
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "std": float(d.std(ddof=1)) if len(d) > 1 else None,
        "ci95": bootstrap_ci(d),
        "p_value": sign_flip_p_value(d),
        "positive": int((d > 0).sum()),
        "total": len(d),
    }


def arm_problem(arm):
    """Why an arm is no evidence (diverged, or not run), or None when it finished healthy."""
    if arm["status"] == "ok":
        return None
    if arm["status"] == "diverged":
        return f"diverged at epoch {arm['diverged_epoch']}"
    return f"not run: {arm['reason']}"


def describe(results, arm, metric):
    """Mean and std of one arm's metric over the seeds where that arm finished healthy."""
    per_seed = {str(s): r[arm][metric] if r[arm]["status"] == "ok" else None for s, r in results.items()}
    present = [v for v in per_seed.values() if v is not None]
    return {
        "mean": float(np.mean(present)) if present else None,
        "std": float(np.std(present, ddof=1)) if len(present) > 1 else None,
        "seeds": len(present),
        "per_seed": per_seed,
    }


def compare(results, other):
    """Paired phase_aware-minus-other statistics over the seeds where both arms finished healthy."""
    excluded = []
    for seed, r in results.items():
        problems = [f"{name} {arm_problem(r[name])}" for name in (PHASE_AWARE, other) if arm_problem(r[name])]
        if problems:
            excluded.append({"seed": seed, "reason": "; ".join(problems)})
    skip = {e["seed"] for e in excluded}
    comparison = {"pairs": len(results) - len(skip), "excluded": excluded}
    for metric in METRICS:
        deltas = {s: paired_delta(r, other, metric) for s, r in results.items() if s not in skip}
        comparison[metric] = paired_stats(deltas) if deltas else None
    return comparison


def load_seed_results(folder, seeds=None):
    """{seed: results} from results_seed_N.json files, refusing any whose run settings disagree."""
    folder = Path(folder)
    if seeds is None:
        found = (re.fullmatch(r"results_seed_(-?\d+)\.json", p.name) for p in folder.glob("results_seed_*.json"))
        seeds = [int(m.group(1)) for m in found if m]
        if not seeds:
            raise UserError(f"no results_seed_N.json files in {folder}")
    results, reference = {}, None
    for seed in sorted(seeds):
        path = folder / f"results_seed_{seed}.json"
        try:
            results[seed] = json.loads(path.read_text())
            identity = run_identity(results[seed]["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a readable results file ({type(e).__name__}: {e})") from None
        if reference is None:
            reference = (path, identity)
        elif identity != reference[1]:
            diff = ", ".join(
                f"{k}={identity[k]!r} vs {reference[1][k]!r}" for k in RUN_KEYS if identity[k] != reference[1][k]
            )
            raise UserError(f"{path.name} and {reference[0].name} were run with different settings: {diff}")
    return results


def build_summary(results):
    seeds = sorted(results)
    results = {s: results[s] for s in seeds}
    arms = [a for a in ARMS if a in results[seeds[0]]]
    summary = {"seeds": seeds, "config": run_identity(results[seeds[0]]["config"]), "arms": {}, "comparisons": {}}
    for arm in arms:
        summary["arms"][arm] = {metric: describe(results, arm, metric) for metric in METRICS}
        summary["arms"][arm]["status"] = {str(s): results[s][arm]["status"] for s in seeds}
    for other in [name for name in arms if name != PHASE_AWARE]:
        summary["comparisons"][f"phase_aware_vs_{other}"] = compare(results, other)
    summary["transitions"] = {str(s): results[s][PHASE_AWARE].get("transition_epochs", {}) for s in seeds}
    summary["success_criteria"] = success_criteria(results, summary["comparisons"]["phase_aware_vs_baseline"])
    return summary


#############################################
#    The seed's success criteria, checked   #
#############################################

# What a successful reproduction shows, as the original project states it: a positive mean delta
# over the baseline, a majority of seeds positive, visible S1 -> S2 transitions in the phase arm,
# and a phase-aware LR that departs from the baseline's only after a detection. The deltas are
# judged on the final accuracy: it involves no selection, and with --val-size it is a clean
# held-out number for every arm.
CRITERIA_METRIC = "final_acc"


def s2_visible(phase_arm):
    """S2 was entered early enough that its multipliers were applied in at least one epoch
    (epoch e applies what the phase after epoch e-1 recommends)."""
    phases = phase_arm["per_epoch"]["phase"]
    applied = sum(phase == S2_AXIS_LOCK for phase in phases[:-1])
    return {"met": applied > 0, "s2_entered_at": phase_arm.get("transition_epochs", {}).get("S2"),
            "epochs_at_s2_multipliers": applied}  # fmt: skip


def lr_departs_after_detection(results):
    """The phase arm's recorded LR equals the baseline's until the epoch after the first detection."""
    base, phase = results[BASELINE]["per_epoch"]["lr"], results[PHASE_AWARE]["per_epoch"]["lr"]
    both = zip(base, phase, strict=False)  # a diverged arm's log is shorter
    departed = [e for e, (a, b) in enumerate(both) if not math.isclose(a, b, rel_tol=1e-12)]
    first_departure = departed[0] if departed else None
    detected = results[PHASE_AWARE].get("transition_epochs", {}).get("S1")
    met = first_departure is None or (detected is not None and first_departure > detected)
    return {"met": met, "first_departure_epoch": first_departure, "first_detection_epoch": detected}


def seed_criteria(results):
    """The criteria that one seed can show on its own."""
    delta = paired_delta(results, BASELINE, CRITERIA_METRIC)
    return {
        "positive_delta": {"met": delta is not None and delta > 0, "metric": CRITERIA_METRIC, "delta": delta},
        "s1_to_s2_visible": s2_visible(results[PHASE_AWARE]),
        "lr_departs_only_after_detection": lr_departs_after_detection(results),
    }


def success_criteria(results, vs_baseline):
    """The four criteria over all seeds; the deltas over healthy pairs only."""
    stats = vs_baseline[CRITERIA_METRIC]
    pairs, mean = (stats["total"], stats["mean"]) if stats else (0, None)
    positive = stats["positive"] if stats else 0
    return {
        "positive_mean_delta": {"met": mean is not None and mean > 0, "metric": CRITERIA_METRIC,
                                "mean_delta": mean, "pairs": pairs},
        "majority_of_seeds_positive": {"met": positive > pairs / 2 if pairs else False, "positive": positive,
                                       "pairs": pairs},
        "s1_to_s2_visible": in_every_seed(results, lambda r: s2_visible(r[PHASE_AWARE])),
        "lr_departs_only_after_detection": in_every_seed(results, lr_departs_after_detection),
    }  # fmt: skip


def in_every_seed(results, check):
    """A per-seed criterion over all seeds: met when every seed meets it."""
    per_seed = {str(s): check(r) for s, r in results.items()}
    met = [c["met"] for c in per_seed.values()]
    return {"met": all(met), "seeds_met": sum(met), "seeds": len(met), "per_seed": per_seed}


def criterion_detail(name, c):
    """The numbers behind one criterion, in words."""
    if "seeds_met" in c:  # a summary's per-seed criterion
        return f"{c['seeds_met']}/{c['seeds']} seeds"
    if name == "positive_mean_delta":
        return f"mean {c['metric']} delta {fmt_acc(c['mean_delta'], '+')} over {c['pairs']} healthy pairs"
    if name == "majority_of_seeds_positive":
        return f"{c['positive']}/{c['pairs']} healthy pairs positive"
    if name == "positive_delta":
        return f"{c['metric']} delta {fmt_acc(c['delta'], '+')}"
    if name == "s1_to_s2_visible":
        if c["s2_entered_at"] is None:
            return "S2 never entered"
        return f"S2 entered at epoch {c['s2_entered_at']}, its multipliers applied in {c['epochs_at_s2_multipliers']}"
    departs, detected = c["first_departure_epoch"], c["first_detection_epoch"]
    departure = "LR never departs" if departs is None else f"LR first departs at epoch {departs}"
    return departure + (", S1 never detected" if detected is None else f", S1 detected at epoch {detected}")


def print_criteria(criteria, prefix=""):
    for name, c in criteria.items():
        verdict = "met" if c["met"] else "NOT met"
        print(f"{prefix}criterion [{verdict:>7}] {name.replace('_', ' ')}: {criterion_detail(name, c)}")


def write_summary(folder, seeds=None):
    results = load_seed_results(folder, seeds)
    summary = build_summary(results)
    plot_summary(results, summary, Path(folder) / "multi_seed_summary.png")
    write_json(Path(folder) / "multi_seed_summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary):
    print(f"\nsummary over seeds {summary['seeds']}")
    for arm, stats in summary["arms"].items():
        best, final = stats["best_acc"], stats["final_acc"]
        print(
            f"  {arm:<11} best {fmt_acc(best['mean'])} +- {fmt_acc(best['std'])}"
            f"  final {fmt_acc(final['mean'])} +- {fmt_acc(final['std'])}  ({best['seeds']} healthy seeds)"
        )
    for name, comparison in summary["comparisons"].items():
        for excluded in comparison["excluded"]:
            print(f"  {name}: seed {excluded['seed']} excluded ({excluded['reason']})")
        for metric in METRICS:
            s = comparison[metric]
            if s is None:
                print(f"  {name} {metric}: no seed with both arms healthy")
                continue
            print(
                f"  {name} {metric}: mean {s['mean']:+.2f} (95% CI {s['ci95'][0]:+.2f}..{s['ci95'][1]:+.2f}), "
                f"sign-flip p = {s['p_value']:.3f}, {s['positive']}/{s['total']} healthy pairs positive"
            )
    print_criteria(summary["success_criteria"], prefix="  ")


#############################################
#                  Figures                  #
#############################################

PHASE_COLORS = {S0_EXPLORE: "#dddddd", S1_BOUNDARY: "#ffd8a8", S2_AXIS_LOCK: "#a5d8ff", S3_POLISH: "#b2f2bb"}
ARM_STYLES = {
    BASELINE: ("tab:gray", "baseline"),
    PHASE_AWARE: ("tab:red", "phase-aware"),
    CONTROL: ("tab:blue", "LR-matched control"),
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shade_phases(ax, phases):
    """Background colour per epoch by the phase the controller was in after that epoch."""
    for epoch, phase in enumerate(phases):
        ax.axvspan(epoch - 0.5, epoch + 0.5, color=PHASE_COLORS[phase], alpha=0.5, lw=0)


def mark_transitions(ax, transition_epochs):
    for key, epoch in transition_epochs.items():
        ax.axvline(epoch, color="k", ls=":", lw=1)
        ax.annotate(f" {key}", (epoch, 0.98), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8)


def phase_legend(fig):
    from matplotlib.patches import Patch

    handles = [Patch(color=color, alpha=0.5, label=phase) for phase, color in PHASE_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)


def save_figure(fig, path):
    plt = pyplot()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_seed(results, path):
    """2x2: test accuracy, training loss, dL with the S1 threshold, LR (log); shaded by phase."""
    plt = pyplot()
    cfg, phase_arm = run_identity(results["config"]) | results["config"], results[PHASE_AWARE]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    panels = [
        ("eval_acc", "test accuracy (%)"),
        ("train_loss", "training loss"),
        ("dL", "dL (smoothed loss slope)"),
        ("lr", "learning rate"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        shade_phases(ax, phase_arm["per_epoch"]["phase"])
        mark_transitions(ax, phase_arm.get("transition_epochs", {}))
        for name in ARMS:
            if name not in results:
                continue
            log = results[name]["per_epoch"]
            values = (
                log[key]
                if key != "dL"
                else [
                    loss_slope(log["train_loss"][: i + 1], cfg["dl_window"], cfg["dl_mode"])
                    for i in range(len(log["train_loss"]))
                ]
            )
            color, label = ARM_STYLES[name]
            ax.plot(range(len(values)), values, color=color, label=label, lw=1.6)
        ax.set_title(title)
    axes[1, 0].axhline(cfg["s1_threshold"], color="tab:orange", ls="--", lw=1, label="S1 threshold")
    if any(results[name]["per_epoch"]["lr"] for name in ARM_STYLES if name in results):
        axes[1, 1].set_yscale("log")  # not while empty: every arm diverged in its first epoch
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(loc="lower right")
    axes[1, 0].legend(loc="lower right")
    fig.suptitle(f"{describe_data(cfg)}, seed {cfg['seed']}, width {cfg['width']}, {cfg['epochs']} epochs")
    phase_legend(fig)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path)


def plot_summary(results, summary, path):
    """Mean +- std test accuracy per arm across seeds with transition marks; per-seed deltas as bars."""
    plt = pyplot()
    seeds = summary["seeds"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for name in summary["arms"]:
        logs = [results[s][name]["per_epoch"]["eval_acc"] for s in seeds]
        epochs = max(map(len, logs))
        table = np.full((len(logs), epochs), np.nan)
        for row, log in zip(table, logs, strict=True):
            row[: len(log)] = log
        count = np.sum(~np.isnan(table), axis=0)
        mean = np.nansum(table, axis=0) / np.maximum(count, 1)
        spread = np.sqrt(np.nansum((table - mean) ** 2, axis=0) / np.maximum(count - 1, 1))
        color, label = ARM_STYLES[name]
        curves.plot(range(epochs), mean, color=color, label=label)
        curves.fill_between(range(epochs), mean - spread, mean + spread, color=color, alpha=0.2)
    for seed in seeds:
        for key, epoch in summary["transitions"][str(seed)].items():
            curves.axvline(epoch, color="k", ls=":", lw=0.8, alpha=0.6)
            curves.annotate(key, (epoch, 0.01), xycoords=("data", "axes fraction"), fontsize=7)
    curves.set(title=f"test accuracy, mean +- std over {len(seeds)} seeds", xlabel="epoch", ylabel="%")
    curves.legend(loc="lower right")
    x = np.arange(len(seeds))
    comparisons = [(name, metric) for name in summary["comparisons"] for metric in METRICS]
    width = 0.8 / len(comparisons)
    for i, (name, metric) in enumerate(comparisons):
        other = name.removeprefix("phase_aware_vs_")
        values = [paired_delta(results[s], other, metric) for s in seeds]
        bars.bar(x + i * width, [np.nan if v is None else v for v in values], width, label=f"{metric} vs {other}")
    bars.axhline(0, color="k", lw=0.8)
    bars.set_xticks(x + width * (len(comparisons) - 1) / 2, [str(s) for s in seeds])
    bars.set(title="phase-aware minus other arm, per seed", xlabel="seed", ylabel="accuracy points")
    bars.legend()
    fig.suptitle(describe_data(summary["config"]))
    fig.tight_layout()
    save_figure(fig, path)


def describe_data(cfg):
    name = "CIFAR-10" if cfg["dataset"] == "cifar10" else "synthetic task (not CIFAR-10)"
    return name + (f", {cfg['subset']}-image subset" if cfg["subset"] else "")


#############################################
#       Replay: phases of a logged run      #
#############################################


class LossLog(NamedTuple):
    train: list  # training loss per epoch
    eval: list | None  # eval loss per epoch (None where missing), or None
    phases: list | None  # phases a results file recorded, to compare with
    config: dict | None  # the settings a results file recorded


# Why a --replay file was read the way it was: its suffix decides.
READ_AS_CSV = "read as CSV because of its .csv suffix"
READ_AS_JSON = "read as JSON because its suffix is not .csv"


def read_loss_log(path):
    """A LossLog from a results_seed_N.json, a JSON list of training losses, or a CSV with a
    train_loss column and an optional eval_loss column (as spreadsheets export them too). The
    suffix decides: .csv is read as CSV, anything else as JSON."""
    path = Path(path)
    as_csv = path.suffix.lower() == ".csv"
    how = READ_AS_CSV if as_csv else READ_AS_JSON
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: drops a spreadsheet's byte-order mark
    except OSError as e:
        raise UserError(f"--replay {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"--replay {path}: not UTF-8 text (a binary file, or UTF-16: save it as UTF-8)") from None
    try:
        if not text.strip():
            raise ValueError("the file is empty")
        if as_csv:
            log = read_csv_losses(text)
        else:
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{how}, but it is not JSON ({e}); for a CSV, name it .csv") from None
            log = read_json_losses(data)
        values = log.train + [e for e in log.eval or [] if e is not None]
        if not all(is_number(v) and math.isfinite(v) for v in values):
            raise ValueError(f"{how}: losses must be finite numbers")
    except ValueError as e:
        raise UserError(f"--replay {path}: {e}") from None
    return log


def is_number(value):
    """An int or float; JSON's true and false are not losses."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_csv_losses(text):
    """Names and values may carry spaces and quotes; an empty eval_loss cell means no evaluation."""
    rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines()) if any(c.strip() for c in row)]
    if not rows or "train_loss" not in rows[0]:
        found = ", ".join(rows[0]) if rows else "only separators"
        raise ValueError(f"{READ_AS_CSV}: needs a train_loss column in its header, found {found}")
    header, rows = rows[0], rows[1:]
    if not rows:
        raise ValueError("no rows under the header")

    def column(name, required):
        at, values = header.index(name), []
        for number, row in enumerate(rows, 1):
            cell = row[at] if at < len(row) else ""
            if not cell and required:
                raise ValueError(f"row {number} has no {name}")
            try:
                values.append(float(cell) if cell else None)
            except ValueError:
                raise ValueError(f"row {number}: {name} {cell!r} is not a number") from None
        return values

    eval_losses = column("eval_loss", required=False) if "eval_loss" in header else None
    return LossLog(column("train_loss", required=True), eval_losses, None, None)


def read_json_losses(data):
    if isinstance(data, list):
        if not data:
            raise ValueError("no losses in it")
        wrong = next((i for i, v in enumerate(data) if not is_number(v)), None)
        if wrong is not None:
            raise ValueError(f"item {wrong} of the list is {json.dumps(data[wrong])}, not a number")
        return LossLog([float(v) for v in data], None, None, None)
    if not (isinstance(data, dict) and isinstance(data.get(PHASE_AWARE), dict) and "config" in data):
        raise ValueError("expected a results_seed_N.json file or a JSON list of numbers")
    try:  # a results file: the phase arm's view of the run
        log = data[PHASE_AWARE]["per_epoch"]
        train, phases = list(log["train_loss"]), log["phase"]
        eval_losses = log.get("val_loss", log["eval_loss"])  # what the controller saw
    except (KeyError, TypeError) as e:
        raise ValueError(f"a results file without the phase arm's per-epoch {e}") from None
    if not train:
        raise ValueError("no losses in it")
    if len(eval_losses) != len(train) or len(phases) != len(train):
        raise ValueError("a results file whose per-epoch lists differ in length")
    return LossLog(train, eval_losses, phases, data["config"])


def replay(config):
    """--replay: the controller over a logged loss curve, printed, compared and written out."""
    check_output_dir(config["output_dir"])
    source = config["replay"]
    log, controller = read_loss_log(source), controller_from_config(config)
    at = next((e for e, loss in enumerate(log.train) if loss <= 0), None)
    if config["dl_mode"] == "relative" and at is not None:
        raise UserError(f"--replay {source}: --dl-mode relative needs positive losses; epoch {at} has {log.train[at]}")
    print(f"replaying {len(log.train)} epochs of {source}")
    rows = replay_rows(log, controller)
    if log.phases is not None:
        print(compare_with_recorded(rows, log, config))
    out, stem = Path(config["output_dir"]), Path(source).stem
    replay_result = {
        "source": str(source),
        "controller": {key: config[key] for key in CONTROLLER_SETTINGS},
        "per_epoch": rows,
        "transitions": controller.transitions,
        "transition_epochs": controller.transition_epochs,
    }
    make_folder(out, "--output-dir")
    write_json(out / f"replay_{stem}.json", replay_result)
    plot_replay(rows, controller, out / f"replay_{stem}.png", title=str(source))
    print(f"wrote {out / f'replay_{stem}.json'} and {out / f'replay_{stem}.png'}")
    return 0


def replay_rows(log, controller):
    """Observe every logged epoch, printing a table row each; the rows, then the transitions."""
    print("epoch  train_loss  eval_loss        dL  phase          next lr_mult  next accum")
    rows = []
    for epoch, loss in enumerate(log.train):
        eval_loss = log.eval[epoch] if log.eval else None
        lr_mult, accumulation = controller.observe(loss, eval_loss)
        row = {"epoch": epoch, "train_loss": loss, "eval_loss": eval_loss, "dL": controller.dL,
               "phase": controller.phase, "lr_mult": lr_mult, "grad_accum": accumulation}  # fmt: skip
        rows.append(row)
        shown = "" if eval_loss is None else f"{eval_loss:.4f}"
        print(
            f"{epoch:>5}  {loss:10.4f}  {shown:>9}  {controller.dL:+.5f}  {controller.phase:<13}"
            f"  {lr_mult:12.2f}  {accumulation:10d}"
        )
    for line in controller.transitions:
        print(f"transition {line}")
    return rows


def compare_with_recorded(rows, log, config):
    """Whether the replayed phases are the ones a results file recorded; if not, where and which flags differ."""
    mismatched = [e for e, (row, phase) in enumerate(zip(rows, log.phases, strict=True)) if row["phase"] != phase]
    if not mismatched:
        return "matches the phases recorded in the file"
    recorded = {k: log.config.get(k, RUN_KEY_DEFAULTS.get(k)) for k in CONTROLLER_SETTINGS}
    used = [f"--{k.replace('_', '-')} {v}" for k, v in recorded.items() if v != config[k]]
    hint = f"; the run used {' '.join(used)}" if used else ""
    return f"differs from the recorded phases at epochs {mismatched}{hint}"


def plot_replay(rows, controller, path, title):
    plt = pyplot()
    fig, (losses, slope) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    epochs = [r["epoch"] for r in rows]
    for ax in (losses, slope):
        shade_phases(ax, [r["phase"] for r in rows])
        mark_transitions(ax, controller.transition_epochs)
    losses.plot(epochs, [r["train_loss"] for r in rows], color="tab:red", label="train loss")
    if any(r["eval_loss"] is not None for r in rows):
        losses.plot(
            epochs,
            [np.nan if r["eval_loss"] is None else r["eval_loss"] for r in rows],
            color="tab:gray",
            label="eval loss",
        )
    losses.set(title=f"replay of {title}", ylabel="loss")
    losses.legend()
    slope.plot(epochs, [r["dL"] for r in rows], color="k", label="dL")
    slope.axhline(controller.s1_threshold, color="tab:orange", ls="--", lw=1, label="S1 threshold")
    slope.axhspan(
        -controller.s2_threshold, controller.s2_threshold, color="tab:blue", alpha=0.15, label="|dL| < S2 threshold"
    )
    slope.set(xlabel="epoch", ylabel="dL")
    slope.legend()
    phase_legend(fig)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)


#############################################
#    Runs: devices, seeds, locks, resume    #
#############################################


def run_training(config):
    """Train this process's seeds (every K-th under torchrun); returns the exit code."""
    with nothing_to_resume_yet():
        set_up_backends()
        rank, world, local_rank, local_world = distributed_env()
        device = pick_device(config["device"], local_rank, local_world)
        precision = choose_precision(config["bf16"], device)
        output_dir = check_output_dir(config["output_dir"])
        if world > 1:
            join_process_group(config, rank)
        seeds = seeds_to_run(config)
        my_seeds = seeds[rank::world]
        # Fail fast: data, splits and resumability of every seed are checked before anything is written.
        plans = {seed: plan_seed(config, seed, device, precision) for seed in my_seeds}
        finished = {s for s, plan in plans.items() if config["resume"] and check_resumable(s, output_dir, plan.config)}
        make_folder(output_dir, "--output-dir")
    with ExitStack() as locks:
        for seed in my_seeds:
            locks.enter_context(seed_lock(output_dir, seed))
        diverged = train_seeds(config, plans, finished, device, precision, output_dir)
    if world > 1:  # every rank learns every rank's divergences, so all agree on the exit code
        gathered = [None] * world
        dist.all_gather_object(gathered, diverged)
        diverged = [line for lines in gathered for line in lines]
    if config["multi_seed"] and rank == 0:
        write_summary(output_dir, seeds)
    if world > 1:
        # No rank exits before rank 0 has written the summary: torchrun stops every worker as soon
        # as one exits with an error.
        dist.barrier()
        dist.destroy_process_group()
    if diverged:
        print(
            f"error: {len(diverged)} arm(s) diverged ({'; '.join(diverged)}); "
            "their results and figures hold the epochs before",
            file=sys.stderr,
        )
        return 1
    return 0


def choose_precision(bf16, device):
    if bf16 == "on" and device.type == "mps":
        raise UserError("--bf16 on is not supported on MPS here")
    return "bf16-autocast" if bf16 == "on" or (bf16 == "auto" and native_bf16(device)) else "fp32"


def join_process_group(config, rank):
    # Only collectives of small Python objects are needed: gloo serves them on any device.
    dist.init_process_group("gloo", timeout=timedelta(days=7))  # seeds may run for days
    if config["dataset"] == "cifar10":  # one rank prepares the data folder, the others then read it
        if rank == 0:
            prepare_cifar10(config["data_dir"])
        dist.barrier()


def distributed_env():
    """(rank, world_size, local_rank, local_world_size) under torchrun; (0, 1, 0, 1) otherwise."""
    rank, world, local_rank = (
        int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))
    )
    return rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))


def pick_device(name, local_rank=0, local_world=1):
    """The device of this process; under torchrun, cuda:LOCAL_RANK.

    Every rank checks the node's process count against its GPUs before any collective, so a bad
    launch stops all ranks with the same line instead of leaving rank 0 waiting for the others.
    """
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda":
        if not cuda:
            raise UserError(f"--device cuda asked for, but torch {torch.__version__} sees no CUDA device")
        count, processes = torch.cuda.device_count(), max(local_world, local_rank + 1)
        if processes > count:
            raise UserError(
                f"{processes} processes on this node need one CUDA device each, but {count}"
                f" are visible: start at most {count} per node (torchrun --nproc_per_node {count})"
            )
        torch.cuda.set_device(local_rank)  # NCCL and the default CUDA stream follow the current device
        return torch.device("cuda", local_rank)
    if name == "mps" and not mps:
        raise UserError("--device mps asked for, but this torch sees no MPS device")
    return torch.device(name)


def check_output_dir(path):
    """Refuse an --output-dir that cannot be created or written, creating nothing yet."""
    path = Path(path)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path} cannot be created or written ({existing} is not a writable folder)")
    return path


def plan_seed(config, seed, device, precision):
    data = synthetic_dataset(seed) if config["dataset"] == "synthetic" else cifar10_dataset(config["data_dir"])
    train_idx, val_idx = split_indices(len(data.train_y), config["subset"], config["val_size"])
    return SeedPlan(data, train_idx, val_idx, seed_config(config, seed, device, precision, data, len(train_idx)))


class SeedPlan(NamedTuple):
    """What one seed will train on, and its config: everything that is checked before training."""

    data: Dataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    config: dict


@functools.cache  # read once per process, whatever the number of seeds
def cifar10_dataset(data_dir):
    folder = prepare_cifar10(data_dir)
    train_x, train_y, test_x, test_y = read_cifar10(folder)
    if len(train_y) != 5 * CIFAR_CASES_PER_BATCH:
        print(f"note: {folder} holds {len(train_y)} training images, not the 50,000 of CIFAR-10")
    return Dataset(train_x, train_y, test_x, test_y)


def seed_config(config, seed, device, precision, data, train_size):
    """The results file's config: the run's settings, plus what was resolved for this seed."""
    modes = {"resume", "summarize", "replay"}  # how to run, not what is computed
    resolved = {k: v for k, v in config.items() if k not in modes}
    resolved.update(
        seed=seed, device=str(device), precision=precision, momentum=MOMENTUM,
        memory_format=str(memory_format_for(device, config["width"])).removeprefix("torch."),
        weight_decay=WEIGHT_DECAY, torch_version=str(torch.__version__),
        tf32=torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32,  # as set_up_backends left it
        model_params=sum(p.numel() for p in CifarResNet(config["width"]).parameters()),
        train_size=train_size, test_size=len(data.test_y),
    )  # fmt: skip
    if config["dataset"] == "synthetic":
        resolved["data_dir"] = None
    return resolved


def run_identity(config):
    return {k: config[k] if k in config else RUN_KEY_DEFAULTS[k] for k in RUN_KEYS}


def check_resumable(seed, output_dir, config):
    """With --resume: whether the seed is already finished, refusing files made with other settings."""
    identity = run_identity(config)
    results = output_dir / f"results_seed_{seed}.json"
    checkpoints = sorted(output_dir.glob(f"checkpoint_seed_{seed}_*.pt"))
    for path in ([results] if results.exists() else []) + checkpoints:
        try:
            if path.suffix == ".json":
                saved = json.loads(path.read_text())["config"]
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if "scheduler" not in state:
                    raise KeyError("no 'scheduler': written by an older version")
                saved = state["config"]
        except Exception as e:
            raise UserError(
                f"--resume: cannot read {path} ({type(e).__name__}: {e}); delete it to start that seed afresh"
            ) from None
        saved = {k: saved.get(k, RUN_KEY_DEFAULTS.get(k)) for k in RUN_KEYS}
        differing = [f"{k} {saved[k]!r} there, {identity[k]!r} now" for k in RUN_KEYS if saved[k] != identity[k]]
        if differing:
            raise UserError(
                f"--resume: {path} was made with other settings ({'; '.join(differing)}); "
                "rerun with those settings, or without --resume to start afresh"
            )
    return results.exists()


@contextmanager
def seed_lock(output_dir, seed):
    """Hold the seed's lock in output_dir for the block, or refuse in one line.

    One seed, one process: a second launch, or a --resume while the first still trains, would
    interleave checkpoints. The lock is the kernel's (flock), so a killed process never leaves a
    lock behind; the file itself only names the holder, and is removed when the block ends.
    """
    if fcntl is None:  # no flock on this platform (Windows): the user keeps seeds apart
        yield
        return
    path = output_dir / f".lock_seed_{seed}"
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"seed {seed} is being trained in {output_dir} by {holder}; wait for it, or stop it and "
                "continue with --resume"
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # its holder finished and removed the file while we waited for it: take the new one
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no one locks a removed file
        handle.close()


def train_seeds(config, plans, finished, device, precision, output_dir):
    """This process's seeds, their locks held; returns one line per diverged arm."""
    for seed in finished:
        finish_skipped_seed(seed, output_dir)
    arms = 3 if config["control"] == "lr-matched" else 2
    todo = {seed: plan for seed, plan in plans.items() if seed not in finished}
    for seed in todo:
        # Temp files a killed process left behind; the seed's lock makes this safe.
        stale = list(output_dir.glob(f".*_seed_{seed}[._]*.tmp-*"))
        if not config["resume"]:
            stale += output_dir.glob(f"checkpoint_seed_{seed}_*.pt")
        for path in stale:
            path.unlink()
    rank, world, _, _ = distributed_env()
    where = f", rank {rank} of {world}" if world > 1 else ""
    print(
        f"{describe_data(config)}: {len(todo)} seed(s) to train on {device}"
        f" ({precision}, {arms} arms, {config['epochs']} epochs{where})"
    )
    if not config["val_size"]:
        print("note: without --val-size the test split drives the controller and best-epoch selection")
    progress = Progress(len(todo) * arms * config["epochs"])
    diverged = []
    for seed, plan in todo.items():
        results = run_seed(start_seed_run(config, seed, plan, device, output_dir, progress))
        diverged += [f"seed {seed} {arm} at epoch {results[arm]['diverged_epoch']}" for arm in ARMS
                     if arm in results and results[arm]["status"] == "diverged"]  # fmt: skip
    return diverged


def start_seed_run(config, seed, plan, device, output_dir, progress):
    """The seed's splits moved onto the device, in the layout the model uses there."""
    layout = memory_format_for(device, config["width"])

    def split(images, labels):
        return DeviceSplit(images, labels, device, layout)

    data = plan.data
    return SeedRun(
        seed=seed, config=plan.config, device=device, output_dir=output_dir, resume=config["resume"],
        train=split(data.train_x[plan.train_idx], data.train_y[plan.train_idx]),
        test=split(data.test_x, data.test_y),
        val=split(data.train_x[plan.val_idx], data.train_y[plan.val_idx]) if config["val_size"] else None,
        progress=progress,
    )  # fmt: skip


def finish_skipped_seed(seed, output_dir):
    """A finished seed under --resume: redraw a figure a kill left missing, drop leftover checkpoints."""
    print(f"seed {seed}: results_seed_{seed}.json exists with these settings; skipped")
    figure = output_dir / f"figure_seed_{seed}.png"
    if not figure.exists():
        plot_seed(json.loads((output_dir / f"results_seed_{seed}.json").read_text()), figure)
        print(f"seed {seed}: redrew {figure.name} from the results file")
    for path in output_dir.glob(f"checkpoint_seed_{seed}_*.pt"):
        path.unlink()


class NothingToResume(KeyboardInterrupt):
    """An interrupt before the first epoch: there is no checkpoint to continue from."""


@contextmanager
def nothing_to_resume_yet():
    try:
        yield
    except KeyboardInterrupt:
        raise NothingToResume from None


#############################################
#                Command line               #
#############################################


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def build_parser():
    p = OneLineParser(
        prog="phase_controller.py",
        description="Phase-aware LR control on CIFAR-10: baseline vs phase-aware arms, paired per seed.",
        allow_abbrev=False,  # an abbreviation is a silent trap: --lr would mean --lr-pulse
    )
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, help=f"seed of a single run (default {SEED})")
    run.add_argument("--multi-seed", action="store_true", help="run every seed of --seeds and write the summary")
    run.add_argument("--seeds", help=f"comma-separated seeds; implies --multi-seed (default {SEEDS})")
    run.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per arm (default %(default)s)")
    run.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto", help="auto: cuda, mps, cpu")
    run.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="auto: on where bf16 is native")
    run.add_argument("--output-dir", default=OUTPUT_DIR, help="results, figures, checkpoints (default %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints; skip finished seeds")
    run.add_argument(
        "--control",
        choices=("none", "lr-matched"),
        default="none",
        help="lr-matched: a third arm, accumulation 1, at one constant LR multiplier that matches the phase arm's "
        "total update (sum of LR x optimizer steps)",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset", choices=("cifar10", "synthetic"), default="cifar10", help="synthetic: for smoke runs"
    )
    data.add_argument("--data-dir", default=DATA_DIR, help=f"holds {CIFAR_FOLDER}/ (default %(default)s)")
    data.add_argument("--subset", type=int, default=0, help="train on N images of a fixed permutation (0: all)")
    data.add_argument("--val-size", type=int, default=0, help="hold out N training images for the controller")
    model = p.add_argument_group("model and optimisation")
    add_numbers(model, ("--width", int, WIDTH, "first-stage channels"),
                ("--batch-size", int, BATCH_SIZE, "training batch, a micro-batch under accumulation"),
                ("--base-lr", float, BASE_LR, "peak of the shared schedule"))  # fmt: skip
    model.add_argument(
        "--warmup-epochs", type=int, help=f"linear warmup epochs ({WARMUP_EPOCHS}, at most --epochs - 1)"
    )
    ctl = p.add_argument_group("phase controller")
    add_numbers(ctl, ("--s1-threshold", float, S1_THRESHOLD, "S0->S1 when dL falls below this"),
                ("--s2-threshold", float, S2_THRESHOLD, "S1->S2 when |dL| falls below this"),
                ("--lr-pulse", float, LR_PULSE, "LR multiplier in S1"),
                ("--grad-accum", int, GRAD_ACCUM, "micro-batches per step in S2 and S3"),
                ("--s3-patience", int, S3_PATIENCE, "stale evaluations in S2 before S3"),
                ("--dl-window", int, DL_WINDOW, "first differences averaged into dL"))  # fmt: skip
    ctl.add_argument("--dl-mode", choices=("absolute", "relative"), default=DL_MODE, help="relative: dL / latest loss")
    modes = p.add_argument_group("other modes (no training)").add_mutually_exclusive_group()
    modes.add_argument("--summarize", metavar="DIR", help="build multi_seed_summary.{json,png} from DIR's results")
    modes.add_argument("--replay", metavar="FILE", help="the controller over a logged loss curve (JSON or CSV)")
    return p


def add_numbers(group, *flags):
    for flag, kind, default, meaning in flags:
        group.add_argument(flag, type=kind, default=default, help=f"{meaning} (default %(default)s)")


def parse_command_line(argv):
    """The run's settings as one dict, each under its flag's name with underscores, checked and
    resolved. This dict drives the run; with what the run resolves, it is each results file's config."""
    config = vars(build_parser().parse_args(argv))
    check_config(config)
    return config


def check_config(config):
    """Every argument rule, before anything is written; resolves the defaults that depend on others."""
    if config["seed"] is not None and (config["multi_seed"] or config["seeds"] is not None):
        raise UserError("--seed runs one seed, --multi-seed/--seeds several: pass one or the other")
    config["multi_seed"] = config["multi_seed"] or config["seeds"] is not None
    config["seed"] = SEED if config["seed"] is None else config["seed"]
    config["seeds"] = SEEDS if config["seeds"] is None else config["seeds"]
    if config["warmup_epochs"] is None:  # short smoke runs keep at least one epoch after the warmup
        config["warmup_epochs"] = min(WARMUP_EPOCHS, max(config["epochs"] - 1, 0))
    rules = [
        (config["epochs"] >= 1, f"--epochs must be >= 1, got {config['epochs']}"),
        (
            0 <= config["warmup_epochs"] < config["epochs"],
            f"--warmup-epochs must be >= 0 and < --epochs ({config['epochs']}), got {config['warmup_epochs']}: "
            f"pass --warmup-epochs {max(config['epochs'] - 1, 0)} or less",
        ),
        (config["batch_size"] >= 1, f"--batch-size must be >= 1, got {config['batch_size']}"),
        (config["width"] >= 1, f"--width must be >= 1, got {config['width']}"),
        (config["subset"] >= 0, f"--subset must be >= 0, got {config['subset']}"),
        (config["val_size"] >= 0, f"--val-size must be >= 0, got {config['val_size']}"),
        (config["base_lr"] > 0 and math.isfinite(config["base_lr"]), f"--base-lr must be > 0, got {config['base_lr']}"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    try:  # the controller's settings: PhaseController's own checks, reported under the flags' names
        controller_from_config(config)
    except ValueError as e:
        key, rest = str(e).split(" ", 1)
        raise UserError(f"--{key.replace('_', '-')} {rest}") from None
    parse_seeds(config["seeds"])


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds has duplicates: {text!r}")
    return seeds


def seeds_to_run(config):
    return parse_seeds(config["seeds"]) if config["multi_seed"] else [config["seed"]]


def main(argv=None):
    """The command line (also the installed `phase-controller` command); returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear at once, also through a pipe
    # A cluster's preemption (SIGTERM) stops a run as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        config = parse_command_line(argv)
        if config["summarize"]:
            write_summary(config["summarize"])
            return 0
        if config["replay"]:
            return replay(config)
        return run_training(config)
    except UserError as e:
        print(f"phase_controller.py: error: {e}", file=sys.stderr)
        return 2
    except NothingToResume:
        print("\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        again = " ".join(
            shlex.quote(a)
            for a in ["python", "phase_controller.py", *argv, *([] if "--resume" in argv else ["--resume"])]
        )
        print(f"\ninterrupted; every completed epoch is checkpointed. Continue with:\n  {again}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
