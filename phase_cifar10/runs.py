"""Runs: a seed's arms from start to results file; seeds, devices, locks, resume and torchrun."""

import json
import os
import socket
import sys
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .data import Dataset, cifar10_dataset, data_label, prepare_cifar10, split_indices, synthetic_dataset
from .evidence import (
    arm_problem,
    build_summary,
    fmt_acc,
    load_seed_results,
    paired_delta,
    print_criteria,
    print_summary,
    seed_criteria,
)
from .figures import plot_seed, plot_summary
from .files import (
    ARMS,
    BASELINE,
    CONTROL,
    METRICS,
    PHASE_AWARE,
    RUN_KEY_DEFAULTS,
    RUN_KEYS,
    UserError,
    check_output_dir,
    make_folder,
    run_identity,
    write_json,
)
from .loader import DeviceSplit
from .model import MOMENTUM, WEIGHT_DECAY, memory_format_for, parameter_count
from .training import (
    Progress,
    SeedRun,
    choose_precision,
    controller_from_config,
    run_arm,
    run_control,
    seed_everything,
    set_up_backends,
)

try:
    import fcntl  # seed locks; absent on Windows
except ImportError:
    fcntl = None


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
            f"seed {seed} control lr_mult {results[CONTROL]['fixed_lr_mult']:.4f} (matched on the total update;"
            f" the phase arm's plain mean multiplier is {results[PHASE_AWARE]['mean_lr_mult']:.4f})"
        )
    for other, suffix in ((BASELINE, ""), (CONTROL, "_vs_control")):
        if other in results:
            best, final = results[f"delta_best_acc{suffix}"], results[f"delta_final_acc{suffix}"]
            print(f"seed {seed} delta (phase_aware - {other}): best {fmt_acc(best, '+')}  final {fmt_acc(final, '+')}")
    for line in results[PHASE_AWARE].get("transitions", []):
        print(f"seed {seed} transition {line}")
    print_criteria(seed_criteria(results), prefix=f"seed {seed} ")


def write_summary(folder, seeds=None):
    """multi_seed_summary.json and .png from the folder's results files, and the summary printed."""
    folder = Path(folder)
    results = load_seed_results(folder, seeds)
    summary = build_summary(results)
    plot_summary(results, summary, folder / "multi_seed_summary.png")
    write_json(folder / "multi_seed_summary.json", summary)
    print_summary(summary)
    return summary


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


def seed_config(config, seed, device, precision, data, train_size):
    """The results file's config: the run's settings, plus what was resolved for this seed."""
    modes = {"resume", "summarize", "replay"}  # how to run, not what is computed
    resolved = {k: v for k, v in config.items() if k not in modes}
    resolved.update(
        seed=seed, device=str(device), precision=precision, momentum=MOMENTUM,
        memory_format=str(memory_format_for(device, config["width"])).removeprefix("torch."),
        weight_decay=WEIGHT_DECAY, torch_version=str(torch.__version__),
        tf32=torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32,  # as set_up_backends left it
        model_params=parameter_count(config["width"]),
        train_size=train_size, test_size=len(data.test_y),
    )  # fmt: skip
    if config["dataset"] == "synthetic":
        resolved["data_dir"] = None
    return resolved


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
                saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
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
        f"{data_label(config)}: {len(todo)} seed(s) to train on {device}"
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
