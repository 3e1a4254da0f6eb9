"""Runs: a seed's arms from start to results file; seeds, devices, locks, resume and torchrun."""

import os
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
    RUN_KEYS,
    SEED_RANGE,
    LockHeld,
    UserError,
    check_output_dir,
    lock_file,
    make_folder,
    run_identity,
    write_json,
)
from .loader import DeviceSplit
from .model import MOMENTUM, WEIGHT_DECAY, memory_format_for, parameter_count
from .records import BadRecord, check_checkpoint, load_checkpoint, read_results_file
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
    with nothing_to_resume_yet(config["output_dir"]):
        set_up_backends()
        rank, world, local_rank, local_world = distributed_env()
        device = pick_device(config["device"], local_rank, local_world)
        precision = choose_precision(config["bf16"], device)
        output_dir = check_output_dir(config["output_dir"])
        if world > 1:
            # Only collectives of small Python objects are needed: gloo serves them on any device.
            dist.init_process_group("gloo", timeout=timedelta(days=7))  # seeds may run for days
    try:
        with nothing_to_resume_yet(output_dir):
            seeds = seeds_to_run(config)
            my_seeds = seeds[rank::world]
            if config["dataset"] == "cifar10":  # rank 0 unpacks (or downloads) the data, the others then read it
                on_every_rank(rank, world, lambda: rank == 0 and prepare_cifar10(config["data_dir"]))
            # Fail fast: data, splits and resumability of every seed are checked before anything is written.
            plans, finished = on_every_rank(
                rank, world, lambda: check_seeds(config, my_seeds, device, precision, output_dir)
            )
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
    finally:
        if world > 1:
            dist.destroy_process_group()
    if diverged:
        print(
            f"error: {len(diverged)} arm(s) diverged ({'; '.join(diverged)}); "
            "their results and figures hold the epochs before",
            file=sys.stderr,
        )
        return 1
    return 0


def check_seeds(config, seeds, device, precision, output_dir):
    """(plans, finished): what each seed trains on, and with --resume the results of finished seeds."""
    plans = {seed: plan_seed(config, seed, device, precision) for seed in seeds}
    finished = {}
    if config["resume"]:
        checked = {seed: check_resumable(seed, output_dir, plan.config) for seed, plan in plans.items()}
        finished = {seed: results for seed, results in checked.items() if results is not None}
    return plans, finished


class StoppedOnRank0(UserError):
    """A bad input on some rank, which rank 0 reports for all; the other ranks stop without a word."""


def on_every_rank(rank, world, check):
    """check() on this rank; under torchrun every rank then learns whether any rank failed it, so
    that a bad input found on one rank stops them all, in one line, before any training."""
    try:
        result, error = check(), None
    except UserError as e:
        result, error = None, str(e)
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    failed = [(where, message) for where, message in enumerate(errors) if message is not None]
    if failed:
        where, message = failed[0]
        if rank != 0:
            raise StoppedOnRank0(message)
        raise UserError(message if world == 1 else f"{message} (found on rank {where}; every rank stopped)")
    return result


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


def check_model_fits(width, device):
    """Refuse a --width whose weights, gradients and momentum alone (4 bytes each) exceed the device's memory."""
    parameters, memory = parameter_count(width), device_memory(device)
    if memory is not None and 12 * parameters > memory:
        raise UserError(
            f"--width {width}: the model's {parameters:,} parameters need {12 * parameters // 2**30:,} GiB for "
            f"weights, gradients and momentum alone, more than the {memory // 2**30:,} GiB of {device}"
        )


def device_memory(device):
    """Bytes of memory of the device, where torch or the OS tell."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else None
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or not these names
        return None


def plan_seed(config, seed, device, precision):
    check_model_fits(config["width"], device)
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
    """With --resume: the seed's results when it is finished, else None; refuses a results file or
    checkpoint of the wrong shape, or made with other settings."""
    identity = run_identity(config)
    path = output_dir / f"results_seed_{seed}.json"
    results = read_results_file(path, seed) if path.exists() else None
    saved = [(path, results["config"])] if results else []
    for arm in ARMS:
        path = output_dir / f"checkpoint_seed_{seed}_{arm}.pt"
        if path.exists():
            try:
                check_checkpoint(state := load_checkpoint(path), arm)
            except BadRecord as e:
                raise UserError(f"--resume: cannot use {path} ({e}); delete it to start that seed afresh") from None
            saved.append((path, state["config"]))
    for path, saved_config in saved:
        before = run_identity(saved_config)
        differing = [f"{k} {before[k]!r} there, {identity[k]!r} now" for k in RUN_KEYS if before[k] != identity[k]]
        if differing:
            raise UserError(
                f"--resume: {path} was made with other settings ({'; '.join(differing)}); "
                "rerun with those settings, or without --resume to start afresh"
            )
    return results


@contextmanager
def seed_lock(output_dir, seed):
    """Hold the seed's lock in output_dir for the block, or refuse in one line.

    One seed, one process: a second launch, or a --resume while the first still trains, would
    interleave checkpoints.
    """
    try:
        with lock_file(output_dir / f".lock_seed_{seed}"):
            yield
    except LockHeld as e:
        raise UserError(
            f"seed {seed} is being trained in {output_dir} by {e.holder}; wait for it, or stop it and "
            "continue with --resume"
        ) from None


def train_seeds(config, plans, finished, device, precision, output_dir):
    """This process's seeds, their locks held; returns one line per diverged arm."""
    for seed, results in finished.items():
        finish_skipped_seed(seed, results, output_dir)
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


def finish_skipped_seed(seed, results, output_dir):
    """A finished seed under --resume: redraw a figure a kill left missing, drop leftover checkpoints."""
    print(f"seed {seed}: results_seed_{seed}.json exists with these settings; skipped")
    figure = output_dir / f"figure_seed_{seed}.png"
    if not figure.exists():
        plot_seed(results, figure)
        print(f"seed {seed}: redrew {figure.name} from the results file")
    for path in output_dir.glob(f"checkpoint_seed_{seed}_*.pt"):
        path.unlink()


class NothingToResume(KeyboardInterrupt):
    """An interrupt before the first epoch, with no checkpoint in the output folder to continue from."""


@contextmanager
def nothing_to_resume_yet(output_dir):
    try:
        yield
    except KeyboardInterrupt:
        try:
            checkpoints = any(Path(output_dir).glob("checkpoint_seed_*.pt"))
        except OSError:
            checkpoints = True  # cannot tell: advise --resume, which loses nothing
        if checkpoints:
            raise
        raise NothingToResume from None


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not all(0 <= seed < SEED_RANGE for seed in seeds):
        raise UserError(f"--seeds must lie in 0..2**32-1, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds has duplicates: {text!r}")
    return seeds


def seeds_to_run(config):
    return parse_seeds(config["seeds"]) if config["multi_seed"] else [config["seed"]]
