"""Phase-aware learning-rate control: PhaseController and PhaseScheduler, for any PyTorch loop.

A PhaseController watches dL, the smoothed per-epoch change of the training loss, and walks through
four phases: explore, boundary, axis lock, polish. Each phase asks the next epoch for a learning-rate
multiplier and a gradient accumulation (the effective batch), from the one phase table below.
PhaseScheduler puts that multiplier on top of any torch LR scheduler; their examples are doctests.

This file needs torch only. Run as a script it is the CIFAR-10 experiment's command line (the
package phase_cifar10 beside it): `python phase_controller.py --help`.
"""

import copy
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "PHASES", "S0_EXPLORE", "S1_BOUNDARY", "S2_AXIS_LOCK", "S3_POLISH",
    "Recommendation", "phase_table", "dL_of", "PhaseController", "PhaseScheduler",
]  # fmt: skip

EVAL_MIN_DELTA = 1e-4  # an eval loss must beat the best by this much to count as progress


def dL_of(losses, dl_window=3, dl_mode="absolute"):
    """dL of a loss curve of n losses: the mean of its last w = min(dl_window, n-1) first
    differences, which telescopes to (L[n-1] - L[n-1-w]) / w; 0 before two losses. dl_mode
    "relative" divides it by the latest loss."""
    dl_window, n = _count("dl_window", dl_window), len(losses)
    if n < 2:
        return 0.0
    w = min(dl_window, n - 1)
    dL = (losses[-1] - losses[-1 - w]) / w
    return dL / losses[-1] if dl_mode == "relative" else dL


PHASES = ("S0_EXPLORE", "S1_BOUNDARY", "S2_AXIS_LOCK", "S3_POLISH")
S0_EXPLORE, S1_BOUNDARY, S2_AXIS_LOCK, S3_POLISH = PHASES


class Recommendation(NamedTuple):
    """What a phase asks of the next epoch."""

    lr_mult: float  # multiplies the base schedule's LR; never compounds
    accumulation: int  # micro-batches per optimizer step


def phase_table(lr_pulse=1.1, grad_accum=2):
    """The one phase -> Recommendation table."""
    return {
        S0_EXPLORE: Recommendation(lr_mult=1.0, accumulation=1),
        S1_BOUNDARY: Recommendation(lr_mult=lr_pulse, accumulation=1),
        S2_AXIS_LOCK: Recommendation(lr_mult=0.5, accumulation=grad_accum),
        S3_POLISH: Recommendation(lr_mult=0.1, accumulation=grad_accum),
    }


class PhaseController:
    """Detects training phases from the per-epoch training loss; recommends LR and accumulation.

    Call observe(train_loss, eval_loss) once per epoch; it returns the Recommendation for the next
    epoch, from phase_table(). At most one transition per call, decided by the phase held when the
    call starts:

        S0_EXPLORE   -> S1_BOUNDARY   when at least 3 losses are seen and dL < s1_threshold
        S1_BOUNDARY  -> S2_AXIS_LOCK  when |dL| < s2_threshold (strictly)
        S2_AXIS_LOCK -> S3_POLISH     after s3_patience eval losses in S2 (not counting the call
                                      that entered it) without beating the best by 1e-4
        S3_POLISH is final.

    It decides on the losses it is given and knows nothing of processes: under DDP pass a loss every
    rank agrees on (PhaseScheduler averages over ranks for you).

    Args:
        s1_threshold: dL below this ends exploration. Default: -0.02.
        s2_threshold: |dL| below this locks the axis. Default: 0.005.
        lr_pulse: the LR multiplier in S1_BOUNDARY. Default: 1.1.
        grad_accum: the accumulation S2 and S3 ask for. Default: 2.
        s3_patience: stale evaluations in S2 before S3. Default: 5.
        dl_window: first differences averaged into dL. Default: 3.
        dl_mode: "absolute" (the original) takes dL in loss units per epoch, so the thresholds mean
            different things at a loss of 2.0 and of 0.05; "relative" divides dL by the latest loss,
            so the thresholds are fractions of the loss per epoch. Default: "absolute".

    Example:
        >>> controller = PhaseController(s1_threshold=-0.05)
        >>> [controller.observe(loss).lr_mult for loss in (2.0, 1.9, 1.7, 1.5)]
        [1.0, 1.0, 1.1, 1.1]
        >>> controller.transition_epochs
        {'S1': 2}

    Like torch's ReduceLROnPlateau, all state (settings and counters) is in state_dict().
    """

    SETTINGS = ("s1_threshold", "s2_threshold", "lr_pulse", "grad_accum", "s3_patience", "dl_window", "dl_mode")

    # The defaults are the original's settings.
    def __init__(
        self, s1_threshold=-0.02, s2_threshold=0.005, lr_pulse=1.1, grad_accum=2, s3_patience=5, dl_window=3,
        dl_mode="absolute",
    ):  # fmt: skip
        if dl_mode not in ("absolute", "relative"):
            raise ValueError(f"dl_mode must be 'absolute' or 'relative', got {dl_mode!r}")
        self.s1_threshold = _finite("s1_threshold", s1_threshold)
        self.s2_threshold = _finite("s2_threshold", s2_threshold)
        if not self.s2_threshold >= 0:
            raise ValueError(f"s2_threshold must be >= 0, got {s2_threshold}")
        self.lr_pulse = _positive("lr_pulse", lr_pulse)
        self.grad_accum = _count("grad_accum", grad_accum)
        self.s3_patience = _count("s3_patience", s3_patience)
        self.dl_window = _count("dl_window", dl_window)
        self.dl_mode = dl_mode
        self.losses = []  # every training loss observed
        self.dL = 0.0
        self.phase = S0_EXPLORE
        self.best_eval = math.inf  # best eval loss seen in S2
        self.stale = 0  # evaluations in S2 since the best improved
        self.transitions = []  # one line per transition, for people: epochs counted from 1
        self.transition_epochs = {}  # {"S1": index, ...}: the index (from 0) of the epoch that caused it

    def __repr__(self):
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.SETTINGS)
        return f"PhaseController(phase={self.phase}, dL={self.dL:+.5f}, epochs_seen={len(self.losses)}, {settings})"

    def recommendation(self):
        """What the current phase asks of the next epoch."""
        return phase_table(self.lr_pulse, self.grad_accum)[self.phase]

    def observe(self, train_loss, eval_loss=None):
        """Take one epoch's mean training loss (and eval loss); return the next epoch's Recommendation."""
        train_loss = _finite("train_loss", train_loss)
        if eval_loss is not None:
            eval_loss = _finite("eval_loss", eval_loss)
        if self.dl_mode == "relative" and not train_loss > 0:
            raise ValueError(f"a relative dL needs positive training losses, got {train_loss}")
        self.losses.append(train_loss)
        dL = dL_of(self.losses, self.dl_window, self.dl_mode)
        if not math.isfinite(dL):  # finite losses near the float limit whose difference is not
            self.losses.pop()
            raise ValueError(f"dL of train_loss {train_loss} overflows to {dL}: losses this large are not a loss curve")
        self.dL = dL
        if self.phase == S0_EXPLORE and len(self.losses) >= 3 and self.dL < self.s1_threshold:
            self._enter(S1_BOUNDARY, f"dL {self.dL:+.4f} < s1_threshold {self.s1_threshold:+.4f}")
        elif self.phase == S1_BOUNDARY and abs(self.dL) < self.s2_threshold:
            self._enter(S2_AXIS_LOCK, f"|dL| {abs(self.dL):.4f} < s2_threshold {self.s2_threshold:.4f}")
        elif self.phase == S2_AXIS_LOCK and eval_loss is not None:
            if eval_loss < self.best_eval - EVAL_MIN_DELTA:
                self.best_eval, self.stale = eval_loss, 0
            else:
                self.stale += 1
            if self.stale >= self.s3_patience:
                self._enter(S3_POLISH, f"eval loss not below {self.best_eval:.4f} for {self.stale} evaluations")
        return self.recommendation()

    def _enter(self, phase, reason):
        self.transitions.append(f"after epoch {len(self.losses)}: {self.phase} -> {phase} ({reason})")
        self.transition_epochs[phase[:2]] = len(self.losses) - 1
        self.phase = phase

    def metrics(self):
        """The state as flat numbers and short strings, for any logger (TensorBoard, W&B, Lightning)."""
        lr_mult, accumulation = self.recommendation()
        return {"phase": self.phase, "phase_index": PHASES.index(self.phase), "dL": self.dL,
                "lr_mult": lr_mult, "accumulation": accumulation, "epochs_seen": len(self.losses)}  # fmt: skip

    def state_dict(self):
        return copy.deepcopy(self.__dict__)

    def load_state_dict(self, state_dict):
        """Load a state_dict() after checking every entry; on failure the controller is unchanged."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(self.__dict__):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a PhaseController state_dict: expected keys {sorted(self.__dict__)}, got {keys}")
        loaded = PhaseController(**{key: state_dict[key] for key in self.SETTINGS})
        losses, phase, stale = state_dict["losses"], state_dict["phase"], state_dict["stale"]
        transitions, epochs = state_dict["transitions"], state_dict["transition_epochs"]
        checks = [
            (isinstance(losses, list), "losses must be a list"),
            (phase in PHASES, f"phase must be one of {PHASES}, got {phase!r}"),
            (isinstance(stale, int) and not isinstance(stale, bool) and stale >= 0, "stale must be an integer >= 0"),
            (isinstance(transitions, list) and all(isinstance(t, str) for t in transitions), "transitions: strings"),
            (isinstance(epochs, dict) and all(k in [p[:2] for p in PHASES[1:]] and type(e) is int
                                              and 0 <= e < len(losses) for k, e in epochs.items()),
             "transition_epochs: phase -> seen epoch"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PhaseController state_dict: {message}")
        loaded.losses = [_finite("losses", loss) for loss in losses]
        loaded.dL, loaded.best_eval = _finite("dL", state_dict["dL"]), _number("best_eval", state_dict["best_eval"])
        loaded.phase, loaded.stale = phase, stale
        loaded.transitions, loaded.transition_epochs = list(transitions), dict(epochs)
        self.__dict__.update(loaded.__dict__)


class PhaseScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A PhaseController's LR multiplier on top of any torch LR scheduler, never compounding.

    After every call each group's LR is the base scheduler's own, unscaled LR times the multiplier:
    the unscaled LRs are put back before each base step, so recursive schedulers (ExponentialLR)
    compute from their own values. Construction steps nothing, unlike torch's own schedulers. It is
    a torch LRScheduler (Lightning and the HF Trainer accept it): base_lrs are the LRs at
    construction, last_epoch counts step() calls, get_last_lr() gives the LRs applied now.

    Accumulation: with a per-batch base schedule, call step() after every micro-batch, also those
    that end in no optimizer step. The base schedule then advances with the data seen, whatever
    accumulation the controller recommends, and ends where it would without accumulation; each
    optimizer step uses the LR in force at its last micro-batch.

    Many processes: when torch.distributed is initialised, observe() is a collective that replaces
    each loss by its plain mean over the ranks (every rank alike, not by its samples), so every rank
    decides the same phase at the same epoch. To weigh otherwise, reduce yourself: sync_ranks=False.

    Args:
        optimizer: the wrapped optimizer.
        controller: a PhaseController, or None for a constant multiplier (fixed_lr_mult).
        base: the base LR scheduler, bound to the same optimizer; None keeps the optimizer's LRs at
            construction as a constant base.
        fixed_lr_mult: the multiplier without a controller; observe() then returns
            Recommendation(fixed_lr_mult, 1). Default: 1.0.
        sync_ranks: average the losses over the ranks when torch.distributed is initialised.
            Default: True.
        process_group: the group to average over; None for the default (world) group.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> base = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        >>> scheduler = PhaseScheduler(optimizer, PhaseController(), base=base)
        >>> for epoch, loss in enumerate((2.0, 1.9, 1.7)):
        ...     optimizer.step()  # per batch: forward, backward, a step every `accumulation` micro-batches
        ...     lr_mult, accumulation = scheduler.observe(loss)
        ...     scheduler.step()  # wherever you would step `base`: per batch or per epoch
        >>> scheduler.get_last_lr()  # 0.1 * 0.5**3, times S1_BOUNDARY's 1.1
        [0.013750000000000002]
    """

    def __init__(self, optimizer, controller=None, base=None, fixed_lr_mult=1.0, sync_ranks=True, process_group=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if controller is not None and not isinstance(controller, PhaseController):
            raise TypeError(f"controller must be a PhaseController or None, got {type(controller).__name__}")
        if base is not None and not callable(getattr(base, "step", None)):
            raise TypeError(f"base must be a torch LR scheduler (with step()) or None, got {type(base).__name__}")
        if base is not None and getattr(base, "optimizer", optimizer) is not optimizer:
            raise ValueError("base is bound to another optimizer: build it on the optimizer given here")
        # Not LRScheduler.__init__: it would take a step at construction.
        self.optimizer, self.controller, self.base = optimizer, controller, base
        self.sync_ranks, self.process_group = bool(sync_ranks), process_group
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.last_epoch, self._step_count = 0, 1  # as torch's schedulers leave them after construction
        self.fixed = Recommendation(_positive("fixed_lr_mult", fixed_lr_mult), 1)
        self.lr_mult, self.accumulation = controller.recommendation() if controller is not None else self.fixed
        self.unscaled_lrs = [group["lr"] for group in optimizer.param_groups]  # the base scheduler's own
        self._apply()

    def __repr__(self):
        base = "constant" if self.base is None else type(self.base).__name__
        return (f"PhaseScheduler(lr_mult={self.lr_mult}, accumulation={self.accumulation}, "
                f"last_lr={self.get_last_lr()}, base={base}, controller={self.controller!r})")  # fmt: skip

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
        if self.sync_ranks and dist.is_available() and dist.is_initialized():
            train_loss, eval_loss = self._mean_over_ranks(train_loss, eval_loss)
        recommendation = self.controller.observe(train_loss, eval_loss)
        self.lr_mult, self.accumulation = recommendation
        self._apply()
        return recommendation

    def _mean_over_ranks(self, train_loss, eval_loss):
        """The plain mean of each loss over the ranks; eval_loss must be given on all ranks or none."""
        group, given = self.process_group, eval_loss is not None
        on_cuda = dist.get_backend(group) == "nccl"  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        values = [_number("train_loss", train_loss), _number("eval_loss", eval_loss) if given else 0.0, float(given)]
        sums = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(sums, group=group)
        (train_sum, eval_sum, eval_count), world = sums.tolist(), dist.get_world_size(group)
        if eval_count not in (0, world):
            raise ValueError(f"eval_loss was given on {int(eval_count)} of {world} ranks: give it on all or none")
        return train_sum / world, eval_sum / world if eval_count else None

    def get_lr(self):
        """The LRs in force: the base's unscaled LRs times the current multiplier."""
        return [unscaled * self.lr_mult for unscaled in self.unscaled_lrs]

    def get_last_lr(self):
        """The LRs applied now, one per param group (the base's times the multiplier)."""
        return list(self._last_lr)

    def metrics(self):
        """The controller's metrics() (or the fixed multiplier's) plus the LR of each param group."""
        numbers = self.controller.metrics() if self.controller is not None else {
            "lr_mult": self.lr_mult, "accumulation": self.accumulation}  # fmt: skip
        return numbers | {f"lr_group_{i}": lr for i, lr in enumerate(self.get_last_lr())}

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
        """Load a state_dict() after checking it; on failure the scheduler is unchanged."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(keys := self.state_dict()):
            raise ValueError(f"not a PhaseScheduler state_dict: expected keys {sorted(keys)}")
        groups, names = len(self.optimizer.param_groups), ("unscaled_lrs", "base_lrs")
        if not all(isinstance(state_dict[name], list) and len(state_dict[name]) == groups for name in names):
            raise ValueError(f"PhaseScheduler state_dict: {' and '.join(names)} need one LR per param group")
        unscaled, base_lrs = ([_finite(name, lr) for lr in state_dict[name]] for name in names)
        lr_mult, accumulation = _positive("lr_mult", state_dict["lr_mult"]), state_dict["accumulation"]
        accumulation = _count("accumulation", accumulation)
        last_epoch = _count("last_epoch", state_dict["last_epoch"], minimum=0)
        # Base and controller load last, restored to their own state if either refuses.
        saved = [(part, part.state_dict()) for part in (self.base, self.controller) if part is not None]
        try:
            if self.base is not None:
                self.base.load_state_dict(state_dict["base"])
            if self.controller is not None:
                self.controller.load_state_dict(state_dict["controller"])
        except Exception:
            for part, state in saved:
                part.load_state_dict(state)
            raise
        self.lr_mult, self.accumulation, self.unscaled_lrs, self.base_lrs = lr_mult, accumulation, unscaled, base_lrs
        self.last_epoch, self._step_count = last_epoch, last_epoch + 1
        self._apply()


def _number(name, value):
    """value as a float: a Python, numpy or one-element torch number, never a bool or a string."""
    is_bool = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    if not (is_bool or isinstance(value, str | bytes) or value is None):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range
            raise ValueError(f"{name} must be finite, got an integer of {len(str(abs(value)))} digits") from None
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a number, got {value!r}")


def _finite(name, value):
    if not math.isfinite(value := _number(name, value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _positive(name, value):
    if not (value := _finite(name, value)) > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _count(name, value, minimum=1):
    """A whole number >= minimum (an int, or a float or numpy number that equals one)."""
    if type(value) is int:  # of any size: no float involved
        whole = value
    else:
        number = _number(name, value)
        whole = int(number) if math.isfinite(number) and number == int(number) else None
    if whole is None or whole < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return whole


if __name__ == "__main__":  # the CIFAR-10 experiment, which imports this file anew as phase_controller
    import sys

    from phase_cifar10 import main

    sys.exit(main(prog="phase_controller.py"))
