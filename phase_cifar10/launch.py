"""Launching: a process's runs on its device (devices.py) among its ranks (ranks.py), the seeds'
locks and resume planning; then each seed trained (training.py) and its results file written."""

import functools
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import __version__, steps, training
from .data import Dataset, cifar10_dataset, data_label, fingerprint, prepare_cifar10, split_indices, synthetic_dataset
from .devices import autocast_for, check_model_fits, choose_precision, machine_name, pick_device, set_up_backends
from .evidence import print_seed_result, seed_results, write_summary
from .figures import plot_seed
from .files import (
    RESTART,
    LockHeld,
    UserError,
    check_output_dir,
    lock_file,
    make_folder,
    os_error,
    write_json,
)
from .loader import DeviceSplit
from .model import MOMENTUM, WEIGHT_DECAY, memory_format_for, parameter_count
from .progress import Progress, seed_name
from .ranks import Meeting, distributed_env, exchange, join_ranks, on_every_rank
from .records import (
    ARMS,
    BORROWED,
    PHASE_AWARE,
    BadRecord,
    arms_of,
    check_checkpoint,
    checkpoint_path,
    figure_path,
    load_checkpoint,
    read_results_file,
    results_path,
)
from .settings import Settings, differences, identity


@dataclass(frozen=True)
class Launch:
    """What this process trains and where: the settings, the device and the precision it computes
    in, the output folder, and under torchrun its rank of world and where the ranks met."""

    settings: Settings
    device: torch.device
    precision: str
    output_dir: Path
    rank: int = 0
    world: int = 1
    meeting: Meeting | None = None


def run_training(*runs):
    """Train this process's seeds of each run (every world-th under torchrun), every arm of every
    run scheduled together, then each multi-seed run's summary; returns the exit code. A run is the
    Settings of one output folder; a study passes one per cell."""
    with nothing_to_resume_yet(runs[0].output_dir):
        first = start(runs[0])
        launches = [first] + [more_on_this_device(first, settings) for settings in runs[1:]]
    with nothing_to_resume_yet(first.output_dir):
        for data_dir in dict.fromkeys(s.data_dir for s in runs if s.dataset == "cifar10"):
            # rank 0 unpacks (or downloads) the data, the others then read it
            on_every_rank(first, lambda data_dir=data_dir: first.rank == 0 and prepare_cifar10(data_dir))
        # Fail fast: data, splits and resumability of every seed are checked before anything is written.
        checked = [on_every_rank(launch, lambda launch=launch: check_seeds(launch, my_seeds(launch)))
                   for launch in launches]  # fmt: skip
        planned = [(launch, plans, finished) for launch, (plans, finished) in zip(launches, checked, strict=True)]
        for launch in launches:
            make_folder(launch.output_dir, "--output-dir")
    with ExitStack() as locks:
        for launch in launches:
            for seed in my_seeds(launch):
                locks.enter_context(seed_lock(launch.output_dir, seed))
        diverged = train_seeds(planned)
    # Every rank learns every rank's divergences, so all agree on the exit code.
    diverged = [line for lines in exchange(first, diverged) for line in lines]
    for launch in launches:
        if launch.settings.multi_seed and launch.rank == 0:
            write_summary(launch.output_dir, launch.settings.seeds_to_run())
    # No rank exits before rank 0 has written the summary: torchrun stops every worker as soon as
    # one exits with an error.
    exchange(first, None)
    if diverged:
        print(
            f"error: {len(diverged)} arm(s) diverged ({'; '.join(diverged)}); "
            "their results and figures hold the epochs before",
            file=sys.stderr,
        )
        return 1
    return 0


def more_on_this_device(first, settings):
    """The Launch of another run in this process: first's device and ranks, its own precision and folder."""
    if settings.device != first.settings.device:
        devices = f"--device {settings.device} and {first.settings.device}"
        raise UserError(f"{devices}: the runs of one process share its device")
    precision = choose_precision(settings.bf16, first.device)
    return replace(first, settings=settings, precision=precision, output_dir=check_output_dir(settings.output_dir))


def my_seeds(launch):
    return launch.settings.seeds_to_run()[launch.rank :: launch.world]


def start(settings):
    """This process's Launch: backends set up, device and precision chosen, torchrun joined."""
    set_up_backends()
    rank, world, local_rank, local_world = distributed_env()
    device = pick_device(settings.device, local_rank, local_world)
    precision = choose_precision(settings.bf16, device)
    output_dir = check_output_dir(settings.output_dir)
    if world > 1 and BORROWED in arms_of(settings.values()):
        raise UserError(f"--control {settings.control}: a seed's borrowed arm waits for another seed's phase arm, "
                        "so its seeds train in one process: start it without torchrun")  # fmt: skip
    meeting = join_ranks(rank, world) if world > 1 else None
    return Launch(settings, device, precision, output_dir, rank, world, meeting)


# ----- planning: what each seed trains on, and what --resume continues -----


class SeedPlan(NamedTuple):
    """What one seed will train on, and its config: everything that is checked before training."""

    data: Dataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    config: dict


def check_seeds(launch, seeds):
    """(plans, finished): what each seed trains on, and with --resume the results of finished seeds.
    A fresh start never replaces an earlier run's files unless --restart asks for it."""
    plans = {seed: plan_seed(launch, seed) for seed in seeds}
    finished = {}
    if launch.settings.resume:
        checked = {seed: check_resumable(launch, seed, plan.config) for seed, plan in plans.items()}
        finished = {seed: results for seed, results in checked.items() if results is not None}
        if seeds and not earlier_work(launch.output_dir, seeds):  # a misspelt folder, say
            print(f"note: --resume found nothing of seeds {seeds} in {launch.output_dir}: they start afresh")
    elif not launch.settings.restart and (earlier := earlier_work(launch.output_dir, seeds)):
        raise UserError(
            f"{launch.output_dir} holds {', '.join(earlier)} of an earlier run: --resume continues it (finished "
            "seeds are skipped), --restart trains these seeds afresh and replaces those files"
        )
    return plans, finished


def earlier_work(folder, seeds):
    """The names of the checkpoints, epoch logs and results files the seeds have in folder."""
    found = []
    for seed in seeds:
        found += sorted(path.name for path in Path(folder).glob(checkpoint_path(folder, seed, suffix=".*").name))
        found += [results_path(folder, seed).name] if results_path(folder, seed).exists() else []
    return found


def plan_seed(launch, seed):
    settings = launch.settings
    check_model_fits(settings.width, launch.device)
    data = synthetic_dataset(seed) if settings.dataset == "synthetic" else cifar10_dataset(settings.data_dir)
    train_idx, val_idx = split_indices(len(data.train_y), settings.subset, settings.val_size)
    return SeedPlan(data, train_idx, val_idx, seed_config(launch, seed, data, len(train_idx)))


def seed_config(launch, seed, data, train_size):
    """The results file's config: the run's settings, plus what was resolved for this seed."""
    settings, device = launch.settings, launch.device
    config = settings.recorded()
    config.update(
        seed=seed, device=str(device), precision=launch.precision, momentum=MOMENTUM,
        memory_format=str(memory_format_for(device, settings.width)).removeprefix("torch."),
        weight_decay=WEIGHT_DECAY, machine=machine_name(device), torch_version=str(torch.__version__),
        tf32=torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32,  # as set_up_backends left it
        model_params=parameter_count(settings.width),
        train_size=train_size, test_size=len(data.test_y), version=__version__, git_commit=git_commit(),
        # What else decides the numbers: the data itself, and a CPU's thread count (its sums' order).
        data_fingerprint=fingerprint(data) if settings.dataset == "cifar10" else None,  # synthetic: made from the seed
        threads=torch.get_num_threads() if device.type == "cpu" else None,
    )  # fmt: skip
    if settings.dataset == "synthetic":
        config["data_dir"] = None
    return config


@functools.cache
def git_commit():
    """The commit of the code that runs, with "-dirty" if its tracked files differ; None outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if changes.returncode != 0 or changes.stdout else "")


def check_resumable(launch, seed, config):
    """With --resume: the seed's results when it is finished, else None; refuses a results file or
    checkpoint of the wrong shape, of another seed, or made with other settings or data."""
    folder, now = launch.output_dir, identity(config)
    path = results_path(folder, seed)
    results = read_results_file(path, seed) if path.exists() else None
    saved = [(path, results["config"])] if results else []
    followed = results[BORROWED]["borrowed_from"] if results and BORROWED in results else None  # its donor
    for name in ARMS:
        path = checkpoint_path(folder, seed, name)
        if path.exists():
            try:
                check_checkpoint(state := load_checkpoint(path), name, seed)
            except OSError as e:
                raise UserError(f"--resume: cannot read {os_error(e)}: fix its permissions and rerun") from None
            except BadRecord as e:
                raise UserError(f"--resume: cannot use {path} ({e}); {RESTART}") from None
            saved.append((path, state["config"]))
            check_same_machine(path, state["config"], config)
            if name == BORROWED:
                followed = state["arm"]["borrowed_from"]
    for path, saved_config in saved:
        if differing := differences(identity(saved_config), now):
            raise UserError(
                f"--resume: {path} was made with other settings ({'; '.join(differing)}); "
                "rerun with those settings, or with --restart to train the seed afresh"
            )
    if followed is not None and followed != (donor := donor_of(launch.settings, seed)):
        raise UserError(
            f"--resume: seed {seed}'s borrowed arm in {folder} follows seed {followed}'s timing, but with --seeds "
            f"{launch.settings.seeds} it borrows seed {donor}'s: rerun with the seeds in their earlier order, or "
            "with --restart to train the seed afresh"
        )
    return results


def check_same_machine(path, saved, config):
    """Refuse to continue a checkpoint that another machine or torch computed: continued here, the
    seed's numbers would be neither machine's, though its results file names one. (A finished seed
    is whole: skipped wherever it ran.) A checkpoint from before the machine was recorded compares
    on torch alone."""
    if moved := differences(saved, config, keys=[key for key in ("machine", "torch_version") if key in saved]):
        raise UserError(
            f"--resume: {path} was computed elsewhere ({'; '.join(moved)}); continued here, the seed's numbers "
            "would come from two machines: resume it there, or rerun with --restart to train the seed afresh"
        )


@contextmanager
def seed_lock(output_dir, seed):
    """Hold the seed's lock in output_dir for the block, or refuse in one line.

    One seed, one process: a second launch, or a --resume while the first still trains, would
    interleave checkpoints.
    """
    try:
        with lock_file(Path(output_dir) / f".lock_seed_{seed}"):
            yield
    except LockHeld as e:
        raise UserError(
            f"seed {seed} is being trained in {output_dir} by {e.holder}; wait for it, or stop it and "
            "continue with --resume"
        ) from None


# ----- training the seeds -----


def train_seeds(runs):
    """This process's seeds of each run (launch, plans, finished), their locks held, every arm of
    every run scheduled together; returns one line per diverged arm."""
    jobs, on_device, stop, diverged = [], {}, threading.Event(), []
    first, to_train = runs[0][0], []  # (launch, {seed: plan} of the seeds it still trains)
    for launch, plans, finished in runs:
        settings, folder = launch.settings, launch.output_dir
        for seed, results in finished.items():
            finish_skipped_seed(seed, results, folder, run_name(launch, runs))
        todo = {seed: plan for seed, plan in plans.items() if seed not in finished}
        for seed in todo:
            remove_leftovers(folder, seed, earlier_run=settings.restart)
        where = f", rank {launch.rank} of {launch.world}" if launch.world > 1 else ""
        print(
            f"{data_label(settings.values())}: {len(todo)} seed(s) to train on {launch.device}"
            f" ({launch.precision}, {len(arms_of(settings.values()))} arms, {settings.epochs} epochs{where}),"
            f" writing to {folder}"
        )
        to_train.append((launch, todo))
    if not first.settings.val_size:
        print("note: without --val-size the test split drives the controller and best-epoch selection")
    arm_epochs = sum(len(todo) * len(arms_of(launch.settings.values())) * launch.settings.epochs
                     for launch, todo in to_train)  # fmt: skip
    sizes = next((plan.config for _, todo in to_train for plan in todo.values()), {"train_size": 0, "test_size": 0})
    progress = Progress(arm_epochs, sizes["train_size"], sizes["test_size"] + first.settings.val_size)

    def seed_done(job, records):
        results = seed_results(job.config, records)
        write_seed(job.folder, job.seed, results, job.run)
        diverged.extend(f"{job.who(name)} in epoch {results[name]['diverged_epoch'] + 1}" for name in ARMS
                        if name in results and results[name]["status"] == "diverged")  # fmt: skip

    for (launch, todo), (_, _, finished) in zip(to_train, runs, strict=True):
        jobs += [replace(job, run=run_name(launch, runs), **borrowing(launch.settings, job.seed, finished))
                 for job in seed_jobs(launch, todo, progress, on_device, stop)]  # fmt: skip
    training.train_seeds(jobs, first.settings.concurrent_arms, seed_done)
    return diverged


def run_name(launch, runs):
    """What begins a run's lines where several train together (a study's cells): its folder's name."""
    return f"{launch.output_dir.name}: " if len(runs) > 1 else ""


def donor_of(settings, seed):
    """The seed whose phase arm's timing the seed's borrowed arm follows: the next seed of the run,
    the first for the last."""
    seeds = settings.seeds_to_run()
    return seeds[(seeds.index(seed) + 1) % len(seeds)]


def borrowing(settings, seed, finished):
    """With --control borrowed, the SeedJob fields of the seed's borrowed arm: its donor, and the
    donor's phase arm when that seed finished in an earlier run."""
    if BORROWED not in arms_of(settings.values()):
        return {}
    donor = donor_of(settings, seed)
    return {"donor": donor, "donor_phase": finished[donor][PHASE_AWARE] if donor in finished else None}


def write_seed(folder, seed, results, run=""):
    """A trained seed's figure, then its results file, then its checkpoints gone; what it showed."""
    plot_seed(results, figure_path(folder, seed))
    # Last: its existence means the seed is complete (--resume skips it, --summarize reads it).
    write_json(results_path(folder, seed), results)
    remove_checkpoints(folder, seed)
    print_seed_result(results, run)
    print(f"{seed_name(seed, run)}: wrote {results_path(folder, seed)} and {figure_path(folder, seed).name}")


def remove_leftovers(folder, seed, earlier_run):
    """The temporary files a killed process left of the seed's files, and with --restart the seed's
    checkpoints, epoch logs, results file and figure. The seed's lock makes this safe."""
    names = [results_path(folder, seed), figure_path(folder, seed), checkpoint_path(folder, seed, suffix=".*")]
    leftovers = [path for name in names for path in folder.glob(f".{name.name}.tmp-*")]
    if earlier_run:
        leftovers += [*folder.glob(checkpoint_path(folder, seed, suffix=".*").name), *names[:2]]
    for path in leftovers:
        path.unlink(missing_ok=True)


def seed_jobs(launch, plans, progress, on_device=None, stop=None):
    """Each seed's training job. The splits go onto the device once, in the layout the model uses
    there, and serve every seed that trains on the same images (every seed, on CIFAR-10). Several
    runs' calls share on_device, which holds the splits, and stop, which stops all their arms."""
    device, settings = launch.device, launch.settings
    layout = memory_format_for(device, settings.width)
    on_device, stop = {} if on_device is None else on_device, stop or threading.Event()

    def split(data, part, indices=None):
        key = (id(data), part, None if indices is None else indices.tobytes())
        if key not in on_device:
            images, labels = (data.test_x, data.test_y) if part == "test" else (data.train_x, data.train_y)
            if indices is not None:
                images, labels = images[indices], labels[indices]
            on_device[key] = DeviceSplit(images, labels, device, layout)
        return on_device[key]

    capture = steps.cuda_graph if device.type == "cuda" and not settings.eager else None
    return [
        training.SeedJob(
            seed=seed,
            config=plan.config,
            device=device,
            train=split(plan.data, "train", plan.train_idx),
            test=split(plan.data, "test"),
            val=split(plan.data, "train", plan.val_idx) if settings.val_size else None,
            autocast=functools.partial(autocast_for, device, launch.precision),
            folder=launch.output_dir,
            resume=settings.resume,
            progress=progress,
            capture=capture,
            stop=stop,
        )
        for seed, plan in plans.items()
    ]


def finish_skipped_seed(seed, results, folder, run=""):
    """A finished seed under --resume: redraw a figure a kill left missing, drop leftover checkpoints."""
    print(f"{seed_name(seed, run)}: {results_path(folder, seed).name} exists with these settings; skipped")
    figure = figure_path(folder, seed)
    if not figure.exists():
        plot_seed(results, figure)
        print(f"{seed_name(seed, run)}: redrew {figure.name} from the results file")
    remove_checkpoints(folder, seed)


def remove_checkpoints(folder, seed):
    """A seed's checkpoints and epoch logs, once its results file holds all they did."""
    for path in folder.glob(checkpoint_path(folder, seed, suffix=".*").name):
        path.unlink()


class NothingToResume(KeyboardInterrupt):
    """An interrupt before the first epoch, with no checkpoint in the output folder to continue from."""


@contextmanager
def nothing_to_resume_yet(output_dir):
    try:
        yield
    except KeyboardInterrupt:
        try:
            checkpoints = any(Path(output_dir).glob(checkpoint_path(output_dir).name))
        except OSError:
            checkpoints = True  # cannot tell: advise --resume, which loses nothing
        if checkpoints:
            raise
        raise NothingToResume from None
