"""One training loop for every arm: an arm's epochs, its checkpoints, and the LR-matched control."""

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from phase_controller import PhaseController, PhaseScheduler

from .files import CONTROL, UserError, one_line, write_atomically
from .loader import DeviceSplit
from .model import EVAL_BATCH_SIZE, EVAL_BATCH_SIZE_CPU, MOMENTUM, WEIGHT_DECAY, base_lr_at, build_model
from .records import ARM_LOGS, PHASE_ARM_LOGS, BadRecord, check_checkpoint, load_checkpoint


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


def choose_precision(bf16, device):
    """What --bf16 auto|on|off means on this device: bf16 autocast, or fp32."""
    if bf16 == "on" and device.type == "mps":
        raise UserError("--bf16 on is not supported on MPS here")
    return "bf16-autocast" if bf16 == "on" or (bf16 == "auto" and native_bf16(device)) else "fp32"


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
    """Epochs done and an ETA over all the epochs this process still has to train."""

    def __init__(self, total_epochs):
        self.total, self.done, self.seconds = total_epochs, 0, 0.0

    def skip(self, epochs):  # epochs restored from a checkpoint, or never run (divergence)
        self.total -= epochs

    def epoch_done(self, seconds):
        self.done += 1
        self.seconds += seconds

    def eta(self):
        left = max(self.total - self.done, 0) * self.seconds / max(self.done, 1)
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


def controller_from_config(config):
    """The phase arm's controller, from the run's settings (which use its keywords' names)."""
    return PhaseController(**{key: config[key] for key in PhaseController.SETTINGS})


def run_arm(run, name, controller=None, fixed_lr_mult=1.0):
    """Train one arm of a seed; the controller (or a constant multiplier) is all that differs between arms.

    After every epoch the whole state is checkpointed atomically, so --resume continues from the
    last completed epoch exactly as if never interrupted. A non-finite loss stops the arm.
    """
    cfg = run.config
    model, optimizer, scheduler = build_arm(run, controller, fixed_lr_mult)
    restored = restore_arm(run, name, model, optimizer, scheduler, fixed_lr_mult)
    arm, start = restored or (new_arm(controller, fixed_lr_mult), 0)
    if arm["status"] != "ok":  # it diverged before an interruption: nothing left to train
        run.progress.skip(cfg["epochs"] - start)
        start = cfg["epochs"]
    for epoch in range(start, cfg["epochs"]):
        # 1. Train at what is in force: the base LR times lr_mult, accumulation micro-batches per step.
        lr, lr_mult, accumulation = scheduler.get_last_lr()[0], scheduler.lr_mult, scheduler.accumulation
        label = f"seed {run.seed} {name:<11} epoch {epoch + 1:>3}/{cfg['epochs']}"
        batches = run.train.train_batches(cfg["batch_size"], run.seed, epoch)
        batches = show_batches(batches, math.ceil(len(run.train) / cfg["batch_size"]), label)
        t0 = time.perf_counter()
        train_loss, train_acc, steps = train_epoch(model, optimizer, batches, accumulation, run.autocast)
        t1 = time.perf_counter()
        row = {"train_loss": train_loss, "train_acc": train_acc, "steps": steps}
        # 2. Evaluate on the test split (and the validation split), unless training diverged.
        if math.isfinite(row["train_loss"]):
            row["eval_loss"], row["eval_acc"] = evaluate(model, run.test, run.autocast)
            if run.val is not None:
                row["val_loss"], row["val_acc"] = evaluate(model, run.val, run.autocast)
        row.update(train_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1)
        seconds = row["train_seconds"] + row["eval_seconds"]
        arm["time_seconds"] += seconds
        diverged = [
            f"{k} {row[k]}" for k in ("train_loss", "eval_loss", "val_loss") if not math.isfinite(row.get(k, 0))
        ]
        if diverged:
            mark_diverged(run, name, arm, epoch, ", ".join(diverged))
        else:
            # 3. Observe the epoch's losses: the recommendation applies from the next epoch on. Arms
            # without a controller observe too; theirs is the fixed one.
            scheduler.observe(row["train_loss"], row.get("val_loss", row["eval_loss"]))
            row["lr"] = lr
            if controller is not None:  # what was applied in the epoch; phase and dL after observing it
                row.update(lr_mult=lr_mult, accumulation=accumulation, phase=controller.phase, dL=controller.dL)
            for key, value in row.items():
                arm["per_epoch"].setdefault(key, []).append(value)
            run.progress.epoch_done(seconds)
            log_epoch(run, name, epoch, row)
        # 4. Step the base schedule to the next epoch's LR, then 5. checkpoint the whole state.
        scheduler.step()
        save_checkpoint(run, name, model, optimizer, scheduler, arm, epoch + 1)
        if arm["status"] != "ok":
            break
    return finish_arm(arm, controller, selected_by="val_acc" if run.val is not None else "eval_acc")


def build_arm(run, controller, fixed_lr_mult):
    """Model, optimizer and PhaseScheduler of an arm: the same initial weights for every arm of a seed."""
    cfg = run.config
    model = build_model(cfg["width"], run.seed, run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    # The optimizer's LR is 1.0, so LambdaLR's factor is the LR itself: exactly base_lr_at.
    base = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: base_lr_at(epoch, cfg["base_lr"], cfg["warmup_epochs"], cfg["epochs"])
    )
    # Under torchrun each rank trains seeds of its own, not a shard of one seed's batches: its
    # controller must see its own losses, never the mean over ranks.
    scheduler = PhaseScheduler(optimizer, controller, base=base, fixed_lr_mult=fixed_lr_mult, sync_ranks=False)
    return model, optimizer, scheduler


def new_arm(controller, fixed_lr_mult):
    arm = {"status": "ok", "time_seconds": 0.0}
    if controller is None:
        arm["fixed_lr_mult"] = fixed_lr_mult
    arm["per_epoch"] = {key: [] for key in (ARM_LOGS if controller is None else PHASE_ARM_LOGS)}
    return arm


def mark_diverged(run, name, arm, epoch, reason):
    """A non-finite loss: the arm is recorded as diverged at this epoch and trains no further."""
    arm.update(status="diverged", diverged_epoch=epoch, diverged_reason=reason)
    print(f"seed {run.seed} {name}: DIVERGED at epoch {epoch} ({reason}); arm stopped")
    run.progress.skip(run.config["epochs"] - epoch)


def log_epoch(run, name, epoch, row):
    line = (
        f"seed {run.seed} {name:<11} epoch {epoch + 1:>3}/{run.config['epochs']}"
        f"  train {row['train_loss']:.4f}  eval {row['eval_loss']:.4f}  acc {row['eval_acc']:6.2f}%"
    )
    if "val_acc" in row:
        line += f"  val {row['val_loss']:.4f} {row['val_acc']:6.2f}%"
    line += f"  lr {row['lr']:.5f}"
    if "phase" in row:
        line += f"  {row['phase']} accum {row['accumulation']}"
    seconds = row["train_seconds"] + row["eval_seconds"]
    print(f"{line}  {seconds:.1f}s  ETA {run.progress.eta()}")


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


def restore_arm(run, name, model, optimizer, scheduler, fixed_lr_mult):
    """(arm record, next epoch) from the arm's checkpoint when resuming; None when starting afresh."""
    path = run.checkpoint_path(name)
    if not (run.resume and path.exists()):
        return None
    settings = optimizer_settings(optimizer)
    try:
        state = load_checkpoint(path, run.device)
        next_epoch, arm = check_checkpoint(state, name)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        check_optimizer(optimizer, settings)
        scheduler.load_state_dict(state["scheduler"])
        if scheduler.controller is None and not (scheduler.lr_mult == arm["fixed_lr_mult"] == fixed_lr_mult):
            raise BadRecord(f"its multiplier is not the arm's {fixed_lr_mult}")
    except Exception as e:
        raise UserError(f"--resume: cannot restore {path} ({one_line(e)}); delete it to start afresh") from None
    run.progress.skip(next_epoch)
    print(f"seed {run.seed} {name}: resumed after epoch {next_epoch - 1}")
    return arm, next_epoch


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


def save_checkpoint(run, name, model, optimizer, scheduler, arm, next_epoch):
    state = {
        "config": run.config,
        "next_epoch": next_epoch,
        "arm": arm,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),  # base schedule, controller and multiplier
    }
    write_atomically(run.checkpoint_path(name), lambda f: torch.save(state, f))


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
    return run_arm(run, CONTROL, fixed_lr_mult=matched_lr_mult(phase_arm, run.config))
