"""A run's settings, each defined once: its default, type, range and help text. The command line is
built from them, and one check serves the flags and the config of every results file and
checkpoint that is read. The controller's settings come from PhaseController itself."""

import argparse
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from phase_controller import PhaseController

from .files import UserError, is_finite_number
from .model import BASE_LR, BATCH_SIZE, EPOCHS, WARMUP_EPOCHS, WIDTH

SEED_RANGE = 2**32  # numpy's seeds: 0 .. 2**32 - 1
MAX_EPOCHS = 1_000_000  # far beyond any run; keeps every count and sum in float range
PRECISIONS = ("fp32", "bf16-autocast")
# The arms a run can train, as its results files name them.
ARMS = ("baseline", "phase_aware", "control", "borrowed")

# The phase controller's settings: its keywords, with their defaults (the original's settings).
# A new keyword becomes a flag and a setting of every run; its help text is the one thing to add.
CONTROLLER_DEFAULTS = {name: p.default for name, p in inspect.signature(PhaseController).parameters.items()}
CONTROLLER_HELP = {
    "s1_threshold": "S0->S1 when dL falls below this",
    "s2_threshold": "S1->S2 when |dL| falls below this",
    "lr_pulse": "LR multiplier in S1",
    "grad_accum": "micro-batches per step in S2 and S3",
    "s3_patience": "stale evaluations in S2 before S3",
    "dl_window": "first differences averaged into dL",
    "dl_mode": "absolute, or relative: dL / latest loss",
}


class Rule(NamedTuple):
    """The values a setting takes: accepts(value), and what a value must be, in words."""

    needs: str
    accepts: Callable
    choices: tuple | None = None  # the names, for a setting that is one of some


def whole(low, high=None):
    words = f"an integer >= {low}" if high is None else f"an integer in {low}..{high:,}"
    return Rule(words, lambda v: type(v) is int and low <= v and (high is None or v <= high))


def one_of(*choices):
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, choices)


FINITE = Rule("a finite number", is_finite_number)
POSITIVE = Rule("a finite number > 0", lambda v: is_finite_number(v) and v > 0)
# An empty or blank path is never taken as the current folder or as absent.
PATH = Rule("a path", lambda v: v is None or isinstance(v, str) and v.strip() != "" and "\0" not in v)
SEED_LIST = Rule("comma-separated distinct integers in 0..2**32-1", lambda v: seeds_in(v) is not None)


def setting(default, help, group, rule=None, flag_default=None):
    """A field of Settings: its default, its flag's help and group, and the Rule for its values."""
    return field(default=default, metadata={"help": help, "group": group, "rule": rule, "flag_default": flag_default})


SEED, SEEDS = 42, "42,137,2024"
GROUPS = ("run", "data", "model and optimisation", "phase controller", "other modes (no training)")
RUN, DATA, MODEL, CONTROLLER, MODES = GROUPS


@dataclass(frozen=True)
class Settings:
    """Every flag of the command line, its dependent defaults resolved, checked.

    Fields are in the flags' order, which is also the order of a results file's config. The
    controller's settings sit in `controller`, under their PhaseController keyword names.

    Example:
        >>> Settings.from_command_line(["--epochs", "3"]).warmup_epochs
        2
    """

    seed: int = setting(SEED, "seed of a single run", RUN, whole(0, SEED_RANGE - 1))
    multi_seed: bool = setting(False, "run every seed of --seeds and write the summary", RUN)
    seeds: str = setting(SEEDS, "comma-separated seeds; implies --multi-seed", RUN, SEED_LIST)
    epochs: int = setting(EPOCHS, "epochs per arm", RUN, whole(1, MAX_EPOCHS))
    device: str = setting("auto", "auto: cuda, mps, cpu", RUN, one_of("auto", "cuda", "mps", "cpu"))
    bf16: str = setting("auto", "auto: on where bf16 is native", RUN, one_of("auto", "on", "off"))
    output_dir: str = setting("results", "results, figures, checkpoints", RUN, PATH)
    resume: bool = setting(False, "continue from the checkpoints; skip finished seeds", RUN)
    restart: bool = setting(False, "train the seeds afresh, replacing their checkpoints and results", RUN)
    concurrent_arms: int = setting(
        0, "arms trained at once, in threads (0: every arm at once on CUDA, one at a time elsewhere)", RUN, whole(0)
    )
    eager: bool = setting(False, "on CUDA, run every step eagerly instead of replaying CUDA graphs (slower)", RUN)
    control: str = setting(
        "none", "lr-matched: an arm at accumulation 1 and one constant LR multiplier that matches the phase arm's "
        "total update (sum of LR x optimizer steps); borrowed: an arm on the phase arm's schedule with the next "
        "seed's timing (its phases entered after the epochs that seed's controller chose); lr-matched+borrowed: both",
        RUN, one_of("none", "lr-matched", "borrowed", "lr-matched+borrowed"),
    )  # fmt: skip
    dataset: str = setting("cifar10", "synthetic: for smoke runs", DATA, one_of("cifar10", "synthetic"))
    data_dir: str = setting("data", "holds cifar-10-batches-py/", DATA, PATH)
    subset: int = setting(0, "train on N images of a fixed permutation (0: all)", DATA, whole(0))
    val_size: int = setting(0, "hold out N training images for the controller", DATA, whole(0))
    width: int = setting(WIDTH, "first-stage channels", MODEL, whole(1))
    batch_size: int = setting(BATCH_SIZE, "training batch, a micro-batch under accumulation", MODEL, whole(1))
    base_lr: float = setting(BASE_LR, "peak of the shared schedule", MODEL, POSITIVE)
    warmup_epochs: int = setting(
        WARMUP_EPOCHS, "linear warmup epochs", MODEL, whole(0), flag_default=f"{WARMUP_EPOCHS}, at most --epochs - 1"
    )
    controller: dict = field(default_factory=lambda: dict(CONTROLLER_DEFAULTS))
    summarize: str | None = setting(None, "build multi_seed_summary.{json,md,png} from DIR's results", MODES, PATH)
    replay: str | None = setting(None, "the controller over a logged loss curve (JSON or CSV)", MODES, PATH)
    replay_arm: str = setting("phase_aware", "which arm of a results file --replay reads", MODES, one_of(*ARMS))

    @classmethod
    def from_command_line(cls, argv, prog="phase_controller.py"):
        """The settings of these arguments; UserError for any that break a rule."""
        given = vars(build_parser(prog).parse_args(argv))  # only the flags that were passed
        if "seed" in given and ("multi_seed" in given or "seeds" in given):
            raise UserError("--seed runs one seed, --multi-seed/--seeds several: pass one or the other")
        if "replay_arm" in given and "replay" not in given:
            raise UserError("--replay-arm picks the curve --replay reads: pass --replay FILE with it")
        if "resume" in given and "restart" in given:
            raise UserError("--resume continues the seeds, --restart replaces them: pass one or the other")
        given["multi_seed"] = given.get("multi_seed", False) or "seeds" in given
        if not given["multi_seed"]:  # the seeds this run trains: its one
            given["seeds"] = str(given.get("seed", SEED))
        if "warmup_epochs" not in given:  # short smoke runs keep at least one epoch after the warmup
            given["warmup_epochs"] = min(WARMUP_EPOCHS, max(given.get("epochs", EPOCHS) - 1, 0))
        controller = CONTROLLER_DEFAULTS | {k: given.pop(k) for k in CONTROLLER_DEFAULTS if k in given}
        settings = cls(**given, controller=controller)
        try:
            check(settings.values(), flag)
        except ValueError as e:
            raise UserError(str(e)) from None
        if "borrowed" in settings.control.split("+") and len(settings.seeds_to_run()) < 2:
            raise UserError(f"--control {settings.control}: a seed borrows the next seed's timing, so it needs two "
                            "seeds or more (--seeds A,B or --multi-seed)")  # fmt: skip
        return settings

    def values(self):
        """Every setting under its own name, the controller's among them, in the flags' order."""
        flat = {}
        for f in fields(self):
            flat |= self.controller if f.name == "controller" else {f.name: getattr(self, f.name)}
        return flat

    def recorded(self):
        """What a results file's config records of these settings: all but how to run."""
        return {k: v for k, v in self.values().items() if k not in HOW_TO_RUN}

    def seeds_to_run(self):
        return seeds_in(self.seeds)


# Settings that change how a run computes, never what: not recorded in its files.
HOW_TO_RUN = ("resume", "restart", "concurrent_arms", "eager", "summarize", "replay", "replay_arm")


# ----- the command line -----


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def flag(name):
    return "--" + name.replace("_", "-")


def build_parser(prog="phase_controller.py"):
    """The flags, one per setting; a flag not passed is absent from the parsed namespace."""
    parser = OneLineParser(
        prog=prog,
        description="Phase-aware LR control on CIFAR-10: baseline vs phase-aware arms, paired per seed.",
        allow_abbrev=False,  # an abbreviation is a silent trap: --lr would mean --lr-pulse
        argument_default=argparse.SUPPRESS,
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    one_mode = groups[MODES].add_mutually_exclusive_group()  # --summarize DIR or --replay FILE
    for f in fields(Settings):
        if f.name == "controller":
            for name, default in CONTROLLER_DEFAULTS.items():
                help = f"{CONTROLLER_HELP.get(name, name)} (default {default})"
                groups[CONTROLLER].add_argument(flag(name), type=type(default), help=help)
            continue
        meta, rule = f.metadata, f.metadata["rule"]
        shown = meta["flag_default"] or f.default
        if f.type is bool:
            groups[meta["group"]].add_argument(flag(f.name), action="store_true", help=meta["help"])
        elif f.default is None:
            metavar = "DIR" if f.name == "summarize" else "FILE"
            one_mode.add_argument(flag(f.name), metavar=metavar, help=meta["help"])
        else:
            choices = rule.choices if rule else None
            help = f"{meta['help']} (default {shown})"
            groups[meta["group"]].add_argument(flag(f.name), type=type(f.default), choices=choices, help=help)
    return parser


# ----- one check for flags and files -----


def check(values, name):
    """ValueError naming the first of these settings that breaks its rule, each named by name(key):
    the flags, or a results file's or checkpoint's config. Checks the settings values holds."""
    rules = {f.name: f.metadata["rule"] for f in fields(Settings) if f.name != "controller"} | RESOLVED_RULES
    for key, rule in rules.items():
        if key in values and rule is not None and not rule.accepts(values[key]):
            raise ValueError(f"{name(key)} must be {rule.needs}, got {values[key]!r}")
    if {"epochs", "warmup_epochs"} <= set(values) and not values["warmup_epochs"] < values["epochs"]:
        raise ValueError(
            f"{name('warmup_epochs')} must be < {name('epochs')} ({values['epochs']}), got {values['warmup_epochs']}"
        )
    controller = {k: values[k] for k in CONTROLLER_DEFAULTS if k in values}
    for key, value in controller.items():  # each alone, so that the error names its setting
        try:
            PhaseController(**{key: value})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name(key)} {str(e).removeprefix(key + ' ')}") from None
    if {"base_lr", "lr_pulse", "epochs"} <= set(values):
        if not math.isfinite(values["base_lr"] * max(values["lr_pulse"], 1.0) * values["epochs"]):
            raise ValueError(
                f"{name('base_lr')} {values['base_lr']} is too large: its LRs summed over the epochs overflow"
            )


# What a run resolves rather than takes from a flag, and records in each results file's config.
RESOLVED_RULES = {
    "momentum": FINITE, "weight_decay": FINITE, "precision": one_of(*PRECISIONS),
    "data_fingerprint": Rule("null (synthetic data) or 16 hexadecimal digits", lambda v: v is None
                             or isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)),
    "threads": Rule("null (a GPU run) or an integer >= 1", lambda v: v is None or type(v) is int and v >= 1),
}  # fmt: skip

# What a seed's numbers depend on: runs that agree on these and the seed compute the same numbers
# on the same machine, so these are what --resume and --summarize compare.
IDENTITY = (
    "dataset", "subset", "val_size", "epochs", "warmup_epochs", "base_lr", "batch_size", "width",
    "momentum", "weight_decay", "precision", "control", *CONTROLLER_DEFAULTS,
)  # fmt: skip


# Recorded by newer runs, so older files may lack them: the data's fingerprint, and the CPU threads
# (which change a CPU run's last bits).
RECORDED_SINCE = ("data_fingerprint", "threads")


def identity(config):
    """The IDENTITY settings of a results file's config, and those RECORDED_SINCE that it holds; a
    controller setting it predates reads with its default. KeyError for any other setting it lacks."""
    known = {k: config[k] if k in config or k not in CONTROLLER_DEFAULTS else CONTROLLER_DEFAULTS[k] for k in IDENTITY}
    return known | {k: config[k] for k in RECORDED_SINCE if k in config}


def differences(before, now, keys=(*IDENTITY, *RECORDED_SINCE)):
    """The settings among keys in which two identities (or configs) differ, as "name value there,
    value now" phrases."""

    def shown(values, key):
        return repr(values[key]) if key in values else "absent"

    keys = [k for k in keys if (k in before, before.get(k)) != (k in now, now.get(k))]
    return [f"{k} {shown(before, k)} there, {shown(now, k)} now" for k in keys]


def check_config(config):
    """ValueError unless a results file's or checkpoint's config holds a valid run identity and seed."""
    try:
        values = identity(config) | {"seed": config["seed"]}
    except KeyError as e:
        raise ValueError(f"config lacks {e}") from None
    check(values, lambda key: f"config's {key}")


def controller_settings(values):
    """The controller's settings among values (a Settings' values(), or a config), as PhaseController's keywords."""
    return {key: values[key] for key in CONTROLLER_DEFAULTS}


def controller_of(values):
    """A PhaseController with the controller's settings among values."""
    return PhaseController(**controller_settings(values))


def seeds_in(text):
    """The seeds of a --seeds value, or None unless it is comma-separated distinct integers in range."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except (ValueError, AttributeError):
        return None
    ok = len(set(seeds)) == len(seeds) and all(0 <= seed < SEED_RANGE for seed in seeds)
    return seeds if ok else None
