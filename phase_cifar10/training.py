"""One training loop for every arm: a seed's arms, an arm's epochs, and the LR-matched control."""

import io
import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from phase_controller import PHASES, PhaseController, PhaseScheduler

from .files import RESTART, UserError, append_to_file, one_line, os_error, signals_deferred, write_atomically
from .loader import DeviceSplit
from .model import MOMENTUM, WEIGHT_DECAY, base_lr_at, build_model
from .progress import Progress, seed_name, show_batches
from .records import (
    ARM_LOGS,
    ARMS,
    BASELINE,
    BORROWED,
    CONTROL,
    CONTROLLED,
    PHASE_ARM_LOGS,
    PHASE_AWARE,
    BadRecord,
    arms_of,
    check_checkpoint,
    checkpoint_path,
    epoch_log_path,
    held_out_loss,
    load_checkpoint,
    transition_key,
)
from .settings import controller_of, controller_settings
from .steps import evaluate, train_epoch


@dataclass
class SeedJob:
    """What every arm of one seed shares: its config, its splits on the device, where it checkpoints."""

    seed: int
    config: dict  # the results file's config: the run's settings and what was resolved for this seed
    device: torch.device
    train: DeviceSplit
    test: DeviceSplit
    val: DeviceSplit | None  # with --val-size: drives the controller and best-epoch selection
    autocast: Callable  # a new bf16 autocast context, or one that changes nothing
    folder: Path  # where the checkpoints go
    resume: bool  # continue each arm from its checkpoint, where there is one
    progress: Progress
    capture: Callable | None = None  # steps.cuda_graph on CUDA: full windows replay a CUDA graph
    stop: threading.Event = field(default_factory=threading.Event)  # set: the arm stops before its next batch
    batch_line: bool = True  # the terminal's self-updating batch line (not while arms train at once)
    run: str = ""  # where several runs train together (a study's cells): "NAME: ", which begins its lines
    donor: int | None = None  # with --control borrowed: the seed whose phase arm's timing the borrowed arm follows
    donor_phase: dict | None = None  # that phase arm's record, when the donor finished in an earlier run

    def who(self, arm):
        """How the console names one of the seed's arms."""
        return f"{seed_name(self.seed, self.run)} {arm}"


def train_seeds(jobs, concurrent_arms, seed_done):
    """Every arm of every job, the earliest seed's first, as many at once as arms_at_once allows;
    calls seed_done(job, records) in this thread as soon as a seed's arms are all done.

    Each seed trains its baseline and phase arm, then its controls, which follow a phase arm's
    whole schedule: the LR-matched control its own seed's, the borrowed arm its donor seed's. One
    at a time, the arms train in this thread, seed after seed, in that order (a borrowed arm as soon
    as its donor's phase arm is done), with the terminal's batch line. Otherwise each arm trains in
    a thread of its own; arms are built (models initialized, checkpoints restored) here, one at a
    time, since initialization draws from torch's global RNG. An error or Ctrl-C stops every arm
    before its next batch; their last checkpoints stand.
    """
    device = jobs[0].device if jobs else torch.device("cpu")
    at_once = arms_at_once(device, concurrent_arms, sum(len(arms_of(job.config)) for job in jobs))
    for job in jobs:
        job.batch_line = at_once == 1
    records = [{} for _ in jobs]  # each job's {arm name: record}; a study's cells share seeds
    written = set()  # the places of the jobs passed to seed_done
    ready = []  # (seed's place, arm's place, job, the arm's constructor): the smallest trains next
    waiting = {}  # (folder, donor seed): the (place, job) of each borrowed arm that waits for its phase arm

    def next_arm():
        ready.sort(key=lambda task: task[:2])
        place, arm_place, job, build = ready.pop(0)
        if arm_place == 0:
            seed_everything(job.seed)
        return place, job, build()

    def follow(place, job, name, phase_record):
        """Queue the control `name` that follows phase_record, or record it as not run."""
        arm = following_arm(job, name, phase_record)
        if isinstance(arm, dict):
            done(place, job, name, arm)
        else:
            ready.append((place, ARMS.index(name), job, arm))

    def done(place, job, name, record):
        records[place][name] = record
        if name == PHASE_AWARE:
            record["mean_lr_mult"] = float(np.mean(record["per_epoch"]["lr_mult"] or [1.0]))
            if CONTROL in arms_of(job.config):
                follow(place, job, CONTROL, record)
            for borrower in waiting.pop((job.folder, job.seed), []):
                follow(*borrower, BORROWED, record)
        # Once: a control found not run within this call (by follow) may have completed the seed already.
        if len(records[place]) == len(arms_of(job.config)) and place not in written:
            written.add(place)
            seed_done(job, records[place])

    for place, job in enumerate(jobs):
        ready += [(place, 0, job, lambda job=job: Arm(job, BASELINE)),
                  (place, 1, job, lambda job=job: Arm(job, PHASE_AWARE, controller_of(job.config)))]  # fmt: skip
        if BORROWED in arms_of(job.config):
            if job.donor_phase is not None:
                follow(place, job, BORROWED, job.donor_phase)
            else:
                waiting.setdefault((job.folder, job.donor), []).append((place, job))
    if unknown := set(waiting) - {(job.folder, job.seed) for job in jobs}:
        raise ValueError(f"borrowed arms wait for phase arms this call does not train: {sorted(unknown)}")

    streams = arm_streams(device, at_once)
    if at_once == 1:
        while ready:
            place, job, arm = next_arm()
            done(place, job, arm.name, train_on_a_stream(job, arm, streams))
        return
    with ThreadPoolExecutor(at_once) as pool:
        running = {}
        try:
            while ready or running:
                while ready and len(running) < at_once:
                    place, job, arm = next_arm()
                    running[pool.submit(train_on_a_stream, job, arm, streams)] = place, job, arm
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    place, job, arm = running.pop(future)
                    done(place, job, arm.name, future.result())
        except BaseException:
            for job in jobs:
                job.stop.set()  # the other arms stop before their next batch; the pool waits for them
            raise


# torch hands out 32 streams per device and priority, round robin: more arms at once would share one,
# and an arm capturing a CUDA graph on a shared stream would capture the other arm's kernels too.
MAX_ARMS_AT_ONCE_ON_CUDA = 32


def arms_at_once(device, concurrent_arms, arms):
    """How many of `arms` train at once: --concurrent-arms, or with 0 every arm on CUDA and one
    elsewhere; on CUDA at most MAX_ARMS_AT_ONCE_ON_CUDA. Says so when that is more than one."""
    asked = concurrent_arms or (arms if device.type == "cuda" else 1)
    at_once = min(asked, MAX_ARMS_AT_ONCE_ON_CUDA) if device.type == "cuda" else asked
    if at_once < min(asked, arms):
        print(f"note: at most {at_once} arms at once on CUDA (one stream each); the others wait their turn")
    if at_once > 1 and arms > 1:
        on = " on a CUDA stream" if device.type == "cuda" else ""
        print(f"up to {min(at_once, arms)} arms at once, each in a thread{on}")
    return max(at_once, 1)


def arm_streams(device, at_once):
    """On CUDA, one stream per arm that may train at once, to be lent to one arm at a time; else None."""
    if device.type != "cuda":
        return None
    streams = queue.SimpleQueue()
    for _ in range(at_once):  # consecutive streams of torch's pool: all distinct
        streams.put(torch.cuda.Stream(device))
    return streams


def train_on_a_stream(job, arm, streams):
    """train_arm; on CUDA on a stream lent to this arm alone while it trains, so that arms in threads
    overlap on the GPU and its windows can be captured (never on the default stream)."""
    if streams is None:
        return train_arm(job, arm)
    stream = streams.get()
    try:
        with on_stream(stream, job.device):
            return train_arm(job, arm)
    finally:
        streams.put(stream)


@contextmanager
def on_stream(stream, device):
    """The block on a CUDA stream, after the work queued so far on the device's current stream (the
    data and the arm were made there), which then waits for it; with stream None, as it is."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def train_arm(job, arm):
    """Train an arm from its next epoch to its last, checkpointed after each; returns its record."""
    for epoch in range(arm.next_epoch, job.config["epochs"]):
        # 1. Train at what is in force: the base LR times lr_mult, accumulation micro-batches per step.
        row, start = arm.in_force(), time.perf_counter()
        batches = job_batches(job, epoch, label=arm.label(epoch))
        row["train_loss"], row["train_acc"], row["steps"] = train_epoch(
            arm.model, arm.optimizer, batches, arm.scheduler.accumulation, job.autocast(), job.capture
        )
        row["train_seconds"] = time.perf_counter() - start
        # 2. Evaluate on the test split (and the validation split), unless training diverged.
        if math.isfinite(row["train_loss"]):
            row |= evaluate_splits(arm.model, job)
        row["eval_seconds"] = time.perf_counter() - start - row["train_seconds"]
        # 3. Observe the held-out loss (a non-finite loss stops the arm): it sets the next epoch's LR.
        diverged = arm.diverged(epoch, row)
        if not diverged:
            arm.scheduler.observe(row["train_loss"], held_out_loss(row))
            arm.log(epoch, row)
        # 4. Step the base schedule to the next epoch's LR, then 5. checkpoint the whole state for --resume.
        arm.scheduler.step()
        arm.save(epoch + 1)
        if diverged:
            break
    return arm.finish()


class Arm:
    """One arm of a seed: its model, optimizer and PhaseScheduler, and its record (the per-epoch
    log and outcome its results file holds), saved and restored whole. Every arm of a seed starts
    from the same weights and sees the same batches; the controller, or a constant multiplier
    without one, is all that differs."""

    def __init__(self, job, name, controller=None, fixed_lr_mult=1.0):
        self.job, self.name, self.controller = job, name, controller
        self.path = checkpoint_path(job.folder, job.seed, name)
        config = job.config
        self.model = build_model(config["width"], job.seed, job.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        # The optimizer's LR is 1.0, so LambdaLR's factor is the LR itself: exactly base_lr_at.
        base = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda epoch: base_lr_at(epoch, config["base_lr"], config["warmup_epochs"], config["epochs"]),
        )
        # Each process trains whole seeds, never a shard of one: the controller sees this arm's losses alone.
        self.scheduler = PhaseScheduler(self.optimizer, controller, base, fixed_lr_mult, sync_ranks=False)
        donor = controller.donor if isinstance(controller, BorrowedTiming) else None
        self.record, self.next_epoch = new_record(name, fixed_lr_mult, donor), 0
        self.logged, self.log_bytes = 0, 0  # what the epoch log beside the checkpoint holds
        if job.resume and self.path.exists():
            self.restore()

    def label(self, epoch):
        return f"{self.job.who(f'{self.name:<11}')} epoch {epoch + 1:>3}/{self.job.config['epochs']}"

    def in_force(self):
        """The LR, and the phase arm's multiplier and accumulation, that the next epoch trains at."""
        row = {"lr": self.scheduler.get_last_lr()[0]}
        if self.controller is not None:
            row |= {"lr_mult": self.scheduler.lr_mult, "accumulation": self.scheduler.accumulation}
        return row

    def diverged(self, epoch, row):
        """Whether a loss of the epoch is not finite; if so the record says so and the arm stops. Counts
        the epoch's seconds either way."""
        self.record["time_seconds"] += row["train_seconds"] + row["eval_seconds"]
        bad = [f"{k} {row[k]}" for k in ("train_loss", "eval_loss", "val_loss") if not math.isfinite(row.get(k, 0))]
        if bad:
            reason = ", ".join(bad)
            self.record.update(status="diverged", diverged_epoch=epoch, diverged_reason=reason)
            print(f"{self.job.who(self.name)}: DIVERGED in epoch {epoch + 1} ({reason}); arm stopped")
            self.job.progress.skip(self.job.config["epochs"] - epoch)
        return bool(bad)

    def log(self, epoch, row):
        """The epoch's row into the record, with the phase and dL after observing it; a progress line."""
        if self.controller is not None:
            row |= {"phase": self.controller.phase, "dL": self.controller.dL}
        for key, value in row.items():
            self.record["per_epoch"].setdefault(key, []).append(value)
        self.job.progress.epoch_done()
        log_epoch(self, epoch, row)

    def save(self, next_epoch):
        """Append the epochs logged since the last save to the epoch log, then checkpoint the rest:
        model, optimizer, schedule, controller and the record but its log, which do not grow with the
        epochs, and the log's length. A kill between the two leaves a log the next resume cuts back."""
        log = self.record["per_epoch"]
        rows = range(self.logged, len(log["train_loss"]))
        lines = "".join(json.dumps({key: values[i] for key, values in log.items()}) + "\n" for i in rows)
        self.log_bytes = append_to_file(epoch_log_path(self.path), lines.encode(), keep=self.log_bytes)
        self.logged = len(log["train_loss"])
        state = {
            "config": self.job.config,
            "next_epoch": next_epoch,
            "arm": self.record | {"per_epoch": {key: [] for key in log}},
            "logged": self.logged,
            "log_bytes": self.log_bytes,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),  # base schedule, controller and multiplier
        }
        checkpoint = io.BytesIO()
        with signals_deferred():  # an interrupt inside torch.save would surface as torch's own error
            torch.save(state, checkpoint)
        write_atomically(self.path, checkpoint.getvalue())

    def restore(self):
        """The whole state of the arm's checkpoint, checked against the arm as built."""
        settings, fixed = optimizer_settings(self.optimizer), self.scheduler.fixed.lr_mult
        try:
            state = load_checkpoint(self.path, self.job.device)
            next_epoch, record = check_checkpoint(state, self.name, self.job.seed)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            check_optimizer(self.optimizer, settings)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.controller is None and not (self.scheduler.lr_mult == record["fixed_lr_mult"] == fixed):
                raise BadRecord(f"its multiplier is not the arm's {fixed}")
        except OSError as e:
            raise UserError(f"--resume: cannot read {os_error(e)}: fix its permissions and rerun") from None
        except Exception as e:
            raise UserError(f"--resume: cannot restore {self.path} ({one_line(e)}); {RESTART}") from None
        self.record, self.next_epoch = record, next_epoch
        self.logged, self.log_bytes = state["logged"], state["log_bytes"]
        self.job.progress.skip(next_epoch)
        print(f"{self.job.who(self.name)}: resumed after epoch {next_epoch}")
        if record["status"] != "ok":  # it diverged before an interruption: nothing left to train
            self.job.progress.skip(self.job.config["epochs"] - next_epoch)
            self.next_epoch = self.job.config["epochs"]

    def finish(self):
        """The record with best and final test accuracy, and the phase arm's transitions. Best is the
        test accuracy at the epoch of the best selection accuracy: the test split's own by default,
        the validation split's with --val-size."""
        record = self.record
        if self.controller is not None:
            record["transitions"] = list(self.controller.transitions)
            record["transition_epochs"] = dict(self.controller.transition_epochs)
        return with_accuracies(record, selected_by="val_acc" if self.job.val is not None else "eval_acc")


def new_record(name, fixed_lr_mult=None, borrowed_from=None):
    """An arm's record before its first epoch: a constant multiplier's, or a controller's logs; the
    borrowed arm's names its donor."""
    controlled = name in CONTROLLED
    record = {"status": "ok", "time_seconds": 0.0} | ({} if controlled else {"fixed_lr_mult": fixed_lr_mult})
    record |= {"borrowed_from": borrowed_from} if name == BORROWED else {}
    record["per_epoch"] = {key: [] for key in (PHASE_ARM_LOGS if controlled else ARM_LOGS)}
    return record


def with_accuracies(record, selected_by):
    """record with its best and final test accuracy: best at the epoch of the best selected_by."""
    log = record["per_epoch"]
    if log["eval_acc"]:
        best = int(np.argmax(log[selected_by]))  # the earliest epoch among ties
        record.update(best_acc=log["eval_acc"][best], best_epoch=best, final_acc=log["eval_acc"][-1])
    else:
        record.update(best_acc=None, best_epoch=None, final_acc=None)
    record["selected_by"] = "validation" if selected_by == "val_acc" else "test"
    return record


def job_batches(job, epoch, label):
    """The epoch's training batches, shown on a terminal as they are consumed."""
    batch_size = job.config["batch_size"]
    batches = until_stopped(job.train.train_batches(batch_size, job.seed, epoch), job.stop)
    if not job.batch_line:
        return batches
    # Only the run's first epoch times its first batches (a wait for an accelerator's queue).
    estimate = job.progress.estimate if job.progress.wants_estimate() else None
    return show_batches(batches, math.ceil(len(job.train) / batch_size), label, estimate=estimate)


class Stopped(Exception):
    """Another arm failed, or Ctrl-C: this arm leaves its epoch; its last checkpoint stands."""


def until_stopped(batches, stop):
    for batch in batches:
        if stop.is_set():
            raise Stopped
        yield batch


def evaluate_splits(model, job):
    """Loss and accuracy on the test split, and on the validation split where there is one."""
    row = dict(zip(("eval_loss", "eval_acc"), evaluate(model, job.test, job.autocast(), job.capture), strict=True))
    if job.val is not None:
        row |= dict(zip(("val_loss", "val_acc"), evaluate(model, job.val, job.autocast(), job.capture), strict=True))
    return row


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def log_epoch(arm, epoch, row):
    """The epoch's progress line."""
    line = (
        f"{arm.label(epoch)}  train {row['train_loss']:.4f}  eval {row['eval_loss']:.4f}  acc {row['eval_acc']:6.2f}%"
    )
    if "val_acc" in row:
        line += f"  val {row['val_loss']:.4f} {row['val_acc']:6.2f}%"
    line += f"  lr {row['lr']:.5f}"
    if "phase" in row:
        line += f"  {row['phase']} accum {row['accumulation']}"
    seconds = row["train_seconds"] + row["eval_seconds"]
    # One write, newline included: the lines of arms training in threads never interleave.
    print(f"{line}  {seconds:.1f}s  ETA {arm.job.progress.eta()}\n", end="")


def optimizer_settings(optimizer):
    """Each param group's settings but its LR, which the scheduler sets."""
    return [
        {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")} for group in optimizer.param_groups
    ]


def check_optimizer(optimizer, settings):
    """A loaded optimizer state trains as the arm's own would: same settings, buffers shaped as the weights."""
    if optimizer_settings(optimizer) != settings:
        raise BadRecord(f"its optimizer settings are not {settings}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None and buffer.shape != p.shape:
                raise BadRecord(f"a momentum buffer of shape {tuple(buffer.shape)} for weights {tuple(p.shape)}")


def matched_lr_mult(phase_record, config):
    """The control's constant c, matched on the total first-order update (LR x optimizer steps).

    Over the epochs the phase arm completed, with base LR b_e, applied multiplier m_e and s_e
    optimizer steps actually taken (ceil(B/k_e) for B micro-batches at accumulation k_e: a short
    last window still steps), against the B steps per epoch of the control at accumulation 1:
        c = sum_e m_e * b_e * s_e / B  /  sum_e b_e
    so the control moves its weights as far in total as the phase arm did. The plain mean of m_e
    ignores that epochs carry very different base LRs and step counts.

    Both sums add left to right, not with sum(): from Python 3.12 on sum() compensates rounding, so
    the last bit of c, and then the control's whole run, would depend on the Python computing it.
    """
    log = phase_record["per_epoch"]
    batches = math.ceil(config["train_size"] / config["batch_size"])
    base = [base_lr_at(e, config["base_lr"], config["warmup_epochs"], config["epochs"]) for e in range(len(log["lr"]))]
    update = total = 0.0
    for m, b, s in zip(log["lr_mult"], base, log["steps"], strict=True):
        update, total = update + m * b * (s / batches), total + b
    return update / total


def following_arm(job, name, phase_record):
    """The constructor of a control that follows a phase arm's whole schedule: the LR-matched control
    (its seed's phase arm), the base schedule times one constant at accumulation 1; the borrowed arm
    (its donor seed's), that arm's phases at that arm's epochs. When the phase arm diverged, its
    schedule is incomplete: the record of a control not run instead."""
    if phase_record["status"] == "ok":
        if name == CONTROL:
            return lambda: Arm(job, CONTROL, fixed_lr_mult=matched_lr_mult(phase_record, job.config))
        timing = BorrowedTiming(job.donor, phase_record["transition_epochs"], **controller_settings(job.config))
        return lambda: Arm(job, BORROWED, timing)
    whose = "phase_aware" if name == CONTROL else f"seed {job.donor}'s phase_aware"
    record = new_record(name, borrowed_from=job.donor)
    record.update(
        status="not_run", reason=f"{whose} {phase_record['status']} in epoch {phase_record['diverged_epoch'] + 1}"
    )
    needs = "the matched constant needs" if name == CONTROL else "it follows"
    print(f"{job.who(name)}: not run ({record['reason']}; {needs} its whole schedule)")
    job.progress.skip(job.config["epochs"])
    return with_accuracies(record, selected_by="eval_acc")


class BorrowedTiming(PhaseController):
    """The borrowed arm's controller: it enters each phase after the epoch at which another seed's
    phase arm did (that arm's transition_epochs), whatever its own dL says. So the borrowed arm
    trains on the phase arm's schedule, multipliers and accumulation alike, at another seed's
    timing: if the moments a controller detects matter, a seed's own timing beats a borrowed one.

    Args:
        donor: the seed whose phase arm's timing it follows.
        transition_epochs: that arm's {"S1": epoch, ...}, epochs counted from 0.
        **settings: PhaseController's, as the run's phase arm has them.
    """

    def __init__(self, donor, transition_epochs, **settings):
        super().__init__(**settings)
        self.donor, self.borrowed_epochs = donor, dict(transition_epochs)

    def next_phase(self, eval_loss):
        if self.phase != PHASES[-1]:
            following = PHASES[PHASES.index(self.phase) + 1]
            if self.borrowed_epochs.get(transition_key(following)) == self.epochs_seen - 1:
                return following, f"as seed {self.donor}'s phase arm did"
        return None

    def load_state_dict(self, state_dict):
        """Refuses the state of a controller that followed another timing, or strayed from this one."""
        if isinstance(state_dict, dict):
            seen = state_dict.get("epochs_seen")
            entered = {key: epoch for key, epoch in self.borrowed_epochs.items() if type(seen) is int and epoch < seen}
            found = [state_dict.get(key) for key in ("donor", "borrowed_epochs", "transition_epochs")]
            if found != [self.donor, self.borrowed_epochs, entered]:
                raise ValueError(
                    f"it followed seed {found[0]}'s timing {found[1]}, entering {found[2]}; this arm follows seed "
                    f"{self.donor}'s {self.borrowed_epochs}"
                )
        super().load_state_dict(state_dict)
