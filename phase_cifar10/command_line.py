"""The command line: the flags, their rules, and main() with its exit codes (0, 1 diverged, 2 error, 130)."""

import argparse
import inspect
import math
import shlex
import sys

import torch

from phase_controller import PhaseController

from .data import CIFAR_FOLDER
from .files import SEED_RANGE, UserError, one_line, os_error
from .model import BASE_LR, BATCH_SIZE, EPOCHS, WARMUP_EPOCHS, WIDTH
from .replay import replay
from .runs import NothingToResume, StoppedOnRank0, parse_seeds, run_training, write_summary
from .training import controller_from_config

SEED = 42
SEEDS = "42,137,2024"
OUTPUT_DIR = "results"
DATA_DIR = "data"
MAX_EPOCHS = 1_000_000  # far beyond any run; keeps every count and sum in float range
# The phase controller's flags default to its own keywords' defaults: the original's settings.
CONTROLLER_DEFAULTS = {name: p.default for name, p in inspect.signature(PhaseController).parameters.items()}


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
    defaults = CONTROLLER_DEFAULTS
    add_numbers(ctl, ("--s1-threshold", float, defaults["s1_threshold"], "S0->S1 when dL falls below this"),
                ("--s2-threshold", float, defaults["s2_threshold"], "S1->S2 when |dL| falls below this"),
                ("--lr-pulse", float, defaults["lr_pulse"], "LR multiplier in S1"),
                ("--grad-accum", int, defaults["grad_accum"], "micro-batches per step in S2 and S3"),
                ("--s3-patience", int, defaults["s3_patience"], "stale evaluations in S2 before S3"),
                ("--dl-window", int, defaults["dl_window"], "first differences averaged into dL"))  # fmt: skip
    relative = "relative: dL / latest loss"
    ctl.add_argument("--dl-mode", choices=("absolute", "relative"), default=defaults["dl_mode"], help=relative)
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
    for flag in ("output_dir", "data_dir", "summarize", "replay"):
        path = config[flag]
        if path is not None and (not path.strip() or "\0" in path):
            raise UserError(f"--{flag.replace('_', '-')} needs a path, got {path!r}")
    rules = [
        (config["epochs"] >= 1, f"--epochs must be >= 1, got {config['epochs']}"),
        (config["epochs"] <= MAX_EPOCHS, f"--epochs must be <= {MAX_EPOCHS:,}, got {config['epochs']}"),
        (0 <= config["seed"] < SEED_RANGE, f"--seed must be >= 0 and < 2**32, got {config['seed']}"),
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
    except (TypeError, ValueError) as e:
        key, rest = str(e).split(" ", 1)
        raise UserError(f"--{key.replace('_', '-')} {rest}") from None
    if not math.isfinite(config["base_lr"] * max(config["lr_pulse"], 1.0) * config["epochs"]):
        raise UserError(f"--base-lr {config['base_lr']} is too large: its LRs summed over the epochs overflow")
    parse_seeds(config["seeds"])


def main(argv=None):
    """The command line (also the installed `phase-controller` command); returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear at once, also through a pipe
    config = None
    try:
        config = parse_command_line(argv)
        if config["summarize"] is not None:
            write_summary(config["summarize"])
            return 0
        if config["replay"] is not None:
            return replay(config)
        return run_training(config)
    except StoppedOnRank0:  # rank 0 says why
        return 2
    except UserError as e:
        return error(e)
    except NothingToResume:
        print("\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted; {what_to_do_next(config, argv)}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or is_allocation_failure(e)):
            raise  # a bug: its traceback is what finds it
        return error(f"out of memory ({one_line(e)}); {what_to_do_next(config, argv, out_of_memory=True)}")
    except OSError as e:
        if e.filename is None:
            raise
        return error(f"cannot use {os_error(e)}")


def error(message):
    print(f"phase_controller.py: error: {message}", file=sys.stderr)
    return 2


def what_to_do_next(config, argv, out_of_memory=False):
    """After an interrupt or running out of memory: what is safe, and the command to continue."""
    if config is None or config["summarize"] is not None or config["replay"] is not None:
        smaller = "a smaller input, or " if out_of_memory else ""
        return f"files are written whole or not at all: rerun the same command ({smaller}on a larger machine)"
    again = " ".join(
        shlex.quote(a) for a in ["python", "phase_controller.py", *argv, *([] if "--resume" in argv else ["--resume"])]
    )
    smaller = "lower --batch-size or --width (a new run) or free memory; " if out_of_memory else ""
    return f"{smaller}every completed epoch is checkpointed. Continue with:\n  {again}"


def is_allocation_failure(e):
    """torch's out-of-memory errors: a CUDA one of its own type, a CPU one a RuntimeError saying so."""
    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, cuda_oom) or "can't allocate memory" in str(e) or "not enough memory" in str(e)
