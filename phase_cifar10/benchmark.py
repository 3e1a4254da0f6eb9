"""How fast this machine trains an arm, and how many arm-epochs per second it trains with several at once.

    python -m phase_cifar10.benchmark --data-dir data            # the default arm on CIFAR-10
    python -m phase_cifar10.benchmark --dataset synthetic --width 8 --epochs 2 --arms 1,2
    python -m phase_cifar10.benchmark --data-dir data --check    # and: the fast path equals eager, runs repeat

It takes the run's flags (--device, --bf16, --width, --batch-size, --subset, --val-size, ...) and
prints, for one arm alone, seconds per epoch for training and for evaluation (CUDA events on a
GPU), eagerly and replaying CUDA graphs, and the aten ops the host dispatches per optimizer step;
then arm-epochs per second with 1, 2, 4 and 8 arms at once (8 arms: 4 seeds' baseline and phase
arm, checkpoints included). With --check it also compares, bit for bit: the fast path against
eager (losses, accuracies, weights, momentum; epochs alternate accumulation 1 and 2), a second run
against the first, and the results of every concurrency against one at a time.
"""

import contextlib
import dataclasses
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import launch, steps, training
from .data import prepare_cifar10
from .files import UserError
from .progress import Progress
from .records import BASELINE, without_timings
from .settings import OneLineParser, Settings

PROG = "python -m phase_cifar10.benchmark"


def main(argv=None):
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0], add_help=True)
    parser.add_argument("--arms", default="1,2,4,8", help="arms at once to measure (default 1,2,4,8)")
    parser.add_argument("--check", action="store_true", help="also check the numbers, bit for bit")
    parser.add_argument("--json", help="also write the figures to this file")
    try:
        ours, run_flags = parser.parse_known_args(argv)
        at_once = [int(n) for n in ours.arms.split(",") if n.strip().isdigit() and int(n) >= 1]
        if len(at_once) != len(ours.arms.split(",")):
            raise UserError(f"--arms {ours.arms}: give whole numbers >= 1, comma-separated")
        with tempfile.TemporaryDirectory() as folder:
            settings = Settings.from_command_line(["--epochs", "2", *run_flags, "--output-dir", folder], PROG)
            figures = benchmark(settings, at_once, ours.check)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if ours.json:
        Path(ours.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if all(figures.get("checks", {}).values()) else 1


def benchmark(settings, at_once, check):
    start = launch.start(settings)
    if settings.dataset == "cifar10":
        prepare_cifar10(settings.data_dir)
    seeds = [1, 2, 3, 4]
    plans = {seed: launch.plan_seed(start, seed) for seed in seeds}
    jobs = launch.seed_jobs(start, plans, Progress(0))
    job, fast = jobs[0], jobs[0].capture or steps.run_eagerly
    print(f"{torch.cuda.get_device_name(start.device) if start.device.type == 'cuda' else machine()}, "
          f"torch {torch.__version__}, {start.precision}, width {settings.width}, {len(job.train):,} training "
          f"images, {len(job.test):,} test, {settings.epochs} epochs per measure")  # fmt: skip
    figures = {"device": str(start.device), "torch": torch.__version__, "precision": start.precision, "checks": {}}
    # One arm alone: eagerly, on the fast path, on it again, and on it without NaN fills (with --check).
    # Deterministic mode fills every new tensor with NaN (extra kernels on CUDA); nothing here reads
    # memory it did not write, so without the fills the numbers must not move.
    runs = {"eager": (None, contextlib.nullcontext), "fast": (fast, contextlib.nullcontext)}
    if check:
        runs |= {"fast again": (fast, contextlib.nullcontext), "fast, no fills": (fast, no_fills)}
    states = {}
    for name, (capture, context) in runs.items():
        with context():
            figures[name], states[name] = one_arm(job, settings.epochs, capture)
        rows = figures[name]["epochs"]
        train_s, eval_s = (" ".join(f"{row[key]:.3f}" for row in rows) for key in ("train_s", "eval_s"))
        print(f"one arm, {name:14}: train {train_s} s, eval {eval_s} s, epoch by epoch")
    figures["ops_per_step"] = {name: ops_per_step(job, capture) for name, capture in (("eager", None), ("fast", fast))}
    print(f"aten ops per optimizer step (accumulation 1): eager {figures['ops_per_step']['eager']:.0f}, "
          f"fast {figures['ops_per_step']['fast']:.0f}")  # fmt: skip
    for name, run in (("fast", "the fast path"), ("fast again", "a second run"), ("fast, no fills", "no NaN fills")):
        if check:
            figures["checks"][f"{run} equals eager"] = same(figures[name], figures["eager"]) and (
                states[name] == states["eager"]
            )
    figures["at_once"], records = {}, {}
    for n in at_once:
        records[n], seconds = train_at_once(jobs, n)
        arm_epochs = len(jobs) * 2 * settings.epochs
        figures["at_once"][n] = {"seconds": seconds, "arm_epochs_per_second": arm_epochs / seconds}
        print(f"{n} arm(s) at once: {arm_epochs} arm-epochs in {seconds:.2f} s, {arm_epochs / seconds:.2f} per second")
    if check:
        figures["checks"]["every concurrency equals one at a time"] = all(
            r == records[at_once[0]] for r in records.values()
        )
    for name, ok in figures["checks"].items():
        print(f"check: {name}: {'yes' if ok else 'NO'}")
    return figures


def machine():
    """The CPU's model name, where the OS tells."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU ({torch.get_num_threads()} threads)"


def one_arm(job, epochs, capture):
    """One arm alone for `epochs` epochs, the LR of the schedule, accumulation 1 and 2 alternating:
    ({"epochs": rows}, a fingerprint of the final weights and momentum); rows hold the seconds of
    training and evaluation and the numbers they computed."""
    arm, rows = training.Arm(job, BASELINE), []  # the run's model, optimizer and base schedule
    with training.on_stream(own_stream(job.device), job.device):
        for epoch in range(epochs):
            batches = job.train.train_batches(job.config["batch_size"], job.seed, epoch)
            with timer(job.device) as train_s:
                trained = steps.train_epoch(arm.model, arm.optimizer, batches, 1 + epoch % 2, job.autocast(), capture)
            with timer(job.device) as eval_s:
                evaluated = steps.evaluate(arm.model, job.test, job.autocast(), capture)
            rows.append({"train_s": train_s(), "eval_s": eval_s(), "train": trained, "eval": evaluated})
            arm.scheduler.step()
    momentum = (state["momentum_buffer"] for state in arm.optimizer.state.values())
    return {"epochs": rows}, [t.cpu().tolist() for t in (*arm.model.state_dict().values(), *momentum)]


@contextlib.contextmanager
def no_fills():
    before = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before


def same(a, b):
    return [(r["train"], r["eval"]) for r in a["epochs"]] == [(r["train"], r["eval"]) for r in b["epochs"]]


def own_stream(device):
    """A stream of its own on CUDA (graphs are never captured on the default stream); None elsewhere."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


@contextlib.contextmanager
def timer(device):
    """Seconds of the block: CUDA events on a GPU, the wall clock elsewhere; read after the block."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield lambda: start.elapsed_time(end) / 1000
        end.record()
        end.synchronize()
    else:
        seconds = []
        begun = time.perf_counter()
        yield lambda: seconds[0]
        seconds.append(time.perf_counter() - begun)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(job, capture):
    """Aten ops the host dispatches per optimizer step once an epoch is under way: the difference
    between epochs of 2w and w windows, over w (so the epoch's fixed costs, its first window and the
    capture among them, cancel)."""
    arm = training.Arm(job, BASELINE)
    batches = list(job.train.train_batches(job.config["batch_size"], job.seed, 0))
    # Full batches only (a short last one would run eagerly), and two windows at least, so that both
    # counts hold the first window and the capture.
    windows = min(8, (len(batches) - 1) // 2)
    if windows < 2:
        raise UserError(f"{len(batches)} batches per epoch: counting ops per step needs at least 5")
    counts = []
    with training.on_stream(own_stream(job.device), job.device):
        for n in (windows, 2 * windows):
            with OpCounter() as counter:
                steps.train_epoch(arm.model, arm.optimizer, batches[:n], 1, job.autocast(), capture)
            counts.append(counter.count)
    return (counts[1] - counts[0]) / windows


def train_at_once(jobs, n):
    """Every job's baseline and phase arm (no control), n at a time, in a new folder: (their records
    without timings, wall seconds)."""
    records = {}
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        total = sum(2 * job.config["epochs"] for job in jobs)
        progress, stop = Progress(total), threading.Event()
        ours = [dataclasses.replace(job, folder=Path(folder), progress=progress, stop=stop,
                                    config=job.config | {"control": "none"}) for job in jobs]  # fmt: skip
        begun = time.perf_counter()
        training.train_seeds(ours, n, lambda job, arms: records.update({job.seed: without_timings(arms)}))
        seconds = time.perf_counter() - begun
    return records, seconds


if __name__ == "__main__":
    sys.exit(main())
