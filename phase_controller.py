"""Phase-aware learning-rate control: PhaseController and PhaseScheduler, for any PyTorch loop.

A PhaseController watches dL, the smoothed per-epoch change of the training loss, and walks through
four phases: explore, boundary, axis lock, polish. Each asks the next epoch for a learning-rate
multiplier and a gradient accumulation (the effective batch), from the one phase table below.
PhaseScheduler puts that multiplier on top of any torch LR scheduler. Needs torch only; run as a
script it is the CIFAR-10 experiment beside it (`python phase_controller.py --help`).
"""

import copy
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["PHASES", "S0_EXPLORE", "S1_BOUNDARY", "S2_AXIS_LOCK", "S3_POLISH", "Recommendation", "phase_table",
           "dL_of", "PhaseController", "PhaseScheduler"]  # fmt: skip

EVAL_MIN_DELTA = 1e-4  # an eval loss must beat the best by this much to count as progress


def dL_of(losses, dl_window=3, dl_mode="absolute"):
    """dL of n losses: the mean of the last w = min(dl_window, n-1) first differences, (L[n-1] - L[n-1-w]) / w;
    0 before two losses. dl_mode "relative" divides it by the latest loss."""
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

    It knows nothing of processes: under DDP give it a loss every rank agrees on (PhaseScheduler does).

    Args (the defaults are the original's settings; state_dict() holds them and every counter):
        s1_threshold: dL below this ends exploration. Default: -0.02.
        s2_threshold: |dL| below this locks the axis. Default: 0.005.
        lr_pulse: the LR multiplier in S1_BOUNDARY. Default: 1.1.
        grad_accum: the accumulation S2 and S3 ask for. Default: 2.
        s3_patience: stale evaluations in S2 before S3. Default: 5.
        dl_window: first differences averaged into dL. Default: 3.
        dl_mode: "absolute" (dL in loss units per epoch) or "relative" (dL / latest loss). Default: "absolute".

    Example:
        >>> controller = PhaseController(s1_threshold=-0.05)
        >>> [controller.observe(loss).lr_mult for loss in (2.0, 1.9, 1.7, 1.5)]
        [1.0, 1.0, 1.1, 1.1]
        >>> controller.transition_epochs
        {'S1': 2}
    """

    SETTINGS = ("s1_threshold", "s2_threshold", "lr_pulse", "grad_accum", "s3_patience", "dl_window", "dl_mode")

    def __init__(self, s1_threshold=-0.02, s2_threshold=0.005, lr_pulse=1.1, grad_accum=2, s3_patience=5, dl_window=3,
                 dl_mode="absolute"):  # fmt: skip
        if dl_mode not in ("absolute", "relative"):
            raise ValueError(f"dl_mode must be 'absolute' or 'relative', got {dl_mode!r}")
        self.s1_threshold = _finite("s1_threshold", s1_threshold)
        self.s2_threshold = _finite("s2_threshold", s2_threshold)
        if not self.s2_threshold >= 0:
            raise ValueError(f"s2_threshold must be >= 0, got {s2_threshold}")
        self.lr_pulse = _finite("lr_pulse", lr_pulse, positive=True)
        self.grad_accum = _count("grad_accum", grad_accum)
        self.s3_patience = _count("s3_patience", s3_patience)
        self.dl_window = _count("dl_window", dl_window)
        self.dl_mode = dl_mode
        self.recent_losses = []  # the last dl_window + 1 training losses: all that dL needs
        self.epochs_seen = 0  # training losses observed
        self.dL, self.phase = 0.0, S0_EXPLORE
        self.best_eval = math.inf  # best eval loss seen in S2
        self.stale = 0  # evaluations in S2 since the best improved
        self.transitions = []  # one line per transition, for people: epochs counted from 1
        self.transition_epochs = {}  # {"S1": index, ...}: the index (from 0) of the epoch that caused it

    def __repr__(self):
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.SETTINGS)
        return f"PhaseController(phase={self.phase}, dL={self.dL:+.5f}, epochs_seen={self.epochs_seen}, {settings})"

    def recommendation(self):
        """What the current phase asks of the next epoch."""
        return phase_table(self.lr_pulse, self.grad_accum)[self.phase]

    def observe(self, train_loss, eval_loss=None):
        """Take one epoch's mean training loss (and eval loss); return the next epoch's Recommendation."""
        train_loss = _finite("train_loss", train_loss)
        eval_loss = None if eval_loss is None else _finite("eval_loss", eval_loss)
        if self.dl_mode == "relative" and not train_loss > 0:
            raise ValueError(f"a relative dL needs positive training losses, got {train_loss}")
        losses = [*self.recent_losses, train_loss][-(self.dl_window + 1) :]
        dL = dL_of(losses, self.dl_window, self.dl_mode)
        if not math.isfinite(dL):  # finite losses near the float limit whose difference is not
            raise ValueError(f"dL of train_loss {train_loss} overflows to {dL}: losses this large are not a loss curve")
        self.recent_losses, self.epochs_seen, self.dL = losses, self.epochs_seen + 1, dL
        phase, reason = self.next_phase(eval_loss) or (self.phase, None)
        if phase != self.phase:
            self.transitions.append(f"after epoch {self.epochs_seen}: {self.phase} -> {phase} ({reason})")
            self.transition_epochs[phase[:2]], self.phase = self.epochs_seen - 1, phase
        return self.recommendation()

    def next_phase(self, eval_loss):
        """(phase, reason) to enter after the epoch just observed, or None: the rules above (override for others)."""
        if self.phase == S0_EXPLORE and self.epochs_seen >= 3 and self.dL < self.s1_threshold:
            return S1_BOUNDARY, f"dL {self.dL:+.4f} < s1_threshold {self.s1_threshold:+.4f}"
        if self.phase == S1_BOUNDARY and abs(self.dL) < self.s2_threshold:
            return S2_AXIS_LOCK, f"|dL| {abs(self.dL):.4f} < s2_threshold {self.s2_threshold:.4f}"
        if self.phase == S2_AXIS_LOCK and eval_loss is not None:
            if eval_loss < self.best_eval - EVAL_MIN_DELTA:
                self.best_eval, self.stale = eval_loss, 0
            else:
                self.stale += 1
            if self.stale >= self.s3_patience:
                return S3_POLISH, f"eval loss not below {self.best_eval:.4f} for {self.stale} evaluations"
        return None

    def metrics(self):
        """The state as flat numbers and short strings, for any logger (TensorBoard, W&B, Lightning)."""
        lr_mult, accumulation = self.recommendation()
        return {"phase": self.phase, "phase_index": PHASES.index(self.phase), "dL": self.dL,
                "lr_mult": lr_mult, "accumulation": accumulation, "epochs_seen": self.epochs_seen}  # fmt: skip

    def state_dict(self):
        return copy.deepcopy(self.__dict__)

    def load_state_dict(self, state_dict):
        """Load a state_dict() after checking every entry, and that they can follow from observing
        losses with its settings; on failure the controller is unchanged."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(self.__dict__):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a PhaseController state_dict: expected keys {sorted(self.__dict__)}, got {keys}")
        loaded = PhaseController(**{key: state_dict[key] for key in self.SETTINGS})
        loaded.__dict__.update(copy.deepcopy({k: v for k, v in state_dict.items() if k not in self.SETTINGS}))
        if problem := loaded._inconsistency():
            raise ValueError(f"PhaseController state_dict: {problem}")
        self.__dict__.update(loaded.__dict__)

    def _inconsistency(self):
        """What in this state cannot follow from observing losses with these settings, or None."""
        seen, phase, epochs, best = self.epochs_seen, self.phase, self.transition_epochs, self.best_eval
        if type(seen) is not int or seen < 0 or phase not in PHASES or not isinstance(epochs, dict):
            return "epochs_seen must be an integer >= 0, phase one of PHASES, transition_epochs a dict"
        entered, late = [p[:2] for p in PHASES[1 : PHASES.index(phase) + 1]], PHASES.index(phase) >= 2
        at = [epochs.get(key) for key in entered]
        checks = {
            "recent_losses: the last dl_window + 1 losses": isinstance(self.recent_losses, list)
            and len(self.recent_losses) == min(seen, self.dl_window + 1) and all(map(_is_finite, self.recent_losses)),
            "dL must be finite": _is_finite(self.dL),
            "stale: stale evaluations in S2": type(self.stale) is int and self.stale >= 0 and (late or not self.stale),
            "best_eval: the best in S2, else inf": _is_finite(best) and late or best == math.inf,
            "transitions: a line per phase entered": isinstance(self.transitions, list)
            and len(self.transitions) == len(entered) and all(isinstance(t, str) for t in self.transitions),
            "transition_epochs: each phase entered, at increasing epochs seen": sorted(epochs) == entered
            and all(type(e) is int for e in at) and at == sorted(set(at)) and all(0 <= e < seen for e in at),
        }  # fmt: skip
        return next((problem for problem, ok in checks.items() if not ok), None)


class PhaseScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A PhaseController's LR multiplier on top of any torch LR scheduler, never compounding.

    Each group's LR is the base scheduler's own, unscaled LR (from which it steps) times the multiplier.
    Construction steps nothing. With a per-batch base, step() after every micro-batch, also those that
    end in no optimizer step. Under torch.distributed observe() is a collective: each loss becomes its
    mean over the ranks, so every rank decides alike. Details in docs/library.md.

    Args:
        optimizer: the wrapped optimizer.
        controller: a PhaseController, or None for a constant multiplier (fixed_lr_mult).
        base: the base LR scheduler, bound to the same optimizer; None keeps the optimizer's LRs at
            construction as a constant base.
        fixed_lr_mult: the multiplier without a controller, at accumulation 1. Default: 1.0.
        sync_ranks: average the losses over the ranks when torch.distributed is initialised. Default: True.
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
        self.fixed = Recommendation(_finite("fixed_lr_mult", fixed_lr_mult, positive=True), 1)
        self.lr_mult, self.accumulation = controller.recommendation() if controller is not None else self.fixed
        self.unscaled_lrs = [group["lr"] for group in optimizer.param_groups]  # the base scheduler's own
        self._apply()

    def __repr__(self):
        shown = f"lr_mult={self.lr_mult}, accumulation={self.accumulation}, last_lr={self.get_last_lr()}"
        return f"PhaseScheduler({shown}, base={type(self.base).__name__}, controller={self.controller!r})"

    def _apply(self, lr_mult=None):
        """Each group's LR: its unscaled LR times lr_mult (the current multiplier when None)."""
        if (groups := len(self.optimizer.param_groups)) != len(self.unscaled_lrs):  # add_param_group since
            raise ValueError(
                f"an optimizer of {groups} param groups, not {len(self.unscaled_lrs)}: build this after add_param_group"
            )
        lr_mult = self.lr_mult if lr_mult is None else lr_mult
        for group, unscaled in zip(self.optimizer.param_groups, self.unscaled_lrs, strict=True):
            group["lr"] = unscaled * lr_mult
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, *args, **kwargs):
        """Advance the base scheduler (arguments pass through, e.g. ReduceLROnPlateau's metric)."""
        if self.base is not None:
            self._apply(1.0)  # the base steps from its own, unscaled LRs
            before = self.base.state_dict()
            try:
                self.base.step(*args, **kwargs)
            except BaseException:  # a base that refuses (a missing metric, a cycle past its end) leaves all as it was
                self.base.load_state_dict(before)
                self._apply()
                raise
            self.unscaled_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.last_epoch, self._step_count = self.last_epoch + 1, self._step_count + 1
        self._apply()

    def observe(self, train_loss, eval_loss=None):
        """One epoch's losses to the controller; its multiplier applies from the next optimizer step."""
        if self.controller is None:
            return self.fixed
        self._apply()  # refuses an optimizer grown since construction before the controller moves
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

    def get_lr(self):  # the LRs in force: the base's unscaled LRs times the current multiplier
        return [unscaled * self.lr_mult for unscaled in self.unscaled_lrs]

    def get_last_lr(self):
        """The LRs applied now, one per param group (the base's times the multiplier)."""
        return list(self._last_lr)

    def metrics(self):
        """The controller's metrics() (or the fixed multiplier's) plus the LR of each param group."""
        numbers = self.controller.metrics() if self.controller else {"lr_mult": self.lr_mult, "accumulation": 1}
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
        """Load the state_dict() of a scheduler built like this one (a base or none, a controller or
        none, the same fixed multiplier and param groups) after checking it; on failure this
        scheduler, its base and its controller are unchanged."""
        expected = self.state_dict()
        if not isinstance(state_dict, dict) or set(state_dict) != set(expected):
            raise ValueError(f"not a PhaseScheduler state_dict: expected keys {sorted(expected)}")
        for part in ("base", "controller"):  # built alike: with a base (a controller) or without
            if (state_dict[part] is None) != (expected[part] is None):
                built = "without" if expected[part] is None else "with"
                raise ValueError(
                    f"PhaseScheduler state_dict: this one was built {built} a {part}, unlike the one saved"
                )
        keys = ("unscaled_lrs", "base_lrs", "lr_mult", "accumulation", "last_epoch")
        unscaled, base_lrs, lr_mult, accumulation, epoch = (state_dict[key] for key in keys)
        base_state, groups = state_dict["base"], len(self.optimizer.param_groups)
        base_lr = base_state.get("_last_lr", unscaled) if isinstance(base_state, dict) else self.unscaled_lrs
        checks = {
            "unscaled_lrs and base_lrs: a finite LR per param group": all(
                isinstance(x, list) and len(x) == groups and all(map(_is_finite, x)) for x in (unscaled, base_lrs)
            ),
            "lr_mult > 0, accumulation and last_epoch integers": _is_finite(lr_mult) and lr_mult > 0
            and type(accumulation) is int and accumulation >= 1 and type(epoch) is int and epoch >= 0,
            f"without a controller, the fixed {tuple(self.fixed)}": self.controller is not None
            or (lr_mult, accumulation) == self.fixed,
            "unscaled_lrs: the base's own LRs": unscaled == base_lr,
        }  # fmt: skip
        if problem := next((problem for problem, ok in checks.items() if not ok), None):
            raise ValueError(f"PhaseScheduler state_dict: {problem}")
        # Base and controller load last, restored to their own state if either refuses.
        saved = [(part, part.state_dict()) for part in (self.base, self.controller) if part is not None]
        try:
            if self.base is not None:
                self.base.load_state_dict(base_state)
            if self.controller is not None:
                self.controller.load_state_dict(state_dict["controller"])
                if (lr_mult, accumulation) != self.controller.recommendation():
                    raise ValueError(f"PhaseScheduler state_dict: {lr_mult, accumulation} is not what its phase asks")
        except Exception:
            for part, state in saved:
                part.load_state_dict(state)
            raise
        self.lr_mult, self.accumulation, self.unscaled_lrs, self.base_lrs = lr_mult, accumulation, unscaled, base_lrs
        self.last_epoch, self._step_count = epoch, epoch + 1
        self._apply()


def _number(name, value):
    """value as a float: a Python, numpy or one-element torch number, never a bool or a string."""
    if not (isinstance(value, bool | str | bytes) or value is None or "bool" in str(getattr(value, "dtype", ""))):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range
            raise ValueError(f"{name} must be finite, got an integer of {len(str(abs(value)))} digits") from None
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a number, got {value!r}")


def _is_finite(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= 1.7976931348623157e308


def _finite(name, value, positive=False):
    """value as a finite float (and > 0 if positive), else ValueError or TypeError naming it."""
    if not math.isfinite(value := _number(name, value)) or positive and not value > 0:
        raise ValueError(f"{name} must be {'> 0' if positive else 'finite'}, got {value}")
    return value


def _count(name, value, minimum=1):
    """A whole number >= minimum (an int of any size, or a float or numpy number that equals one)."""
    number = value if type(value) is int else _number(name, value)
    if not ((type(number) is int or math.isfinite(number) and number == int(number)) and number >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(number)


if __name__ == "__main__":  # the CIFAR-10 experiment, which imports this file anew as phase_controller
    from phase_cifar10 import main

    raise SystemExit(main(prog="phase_controller.py"))
