"""The records a run leaves, results_seed_N.json and checkpoint_seed_N_ARM.pt: their names, the
arms they hold, and their shape checked before any use. A file edited, truncated or made by hand is
refused in one line that names it, never half-used. Every reader (--resume, --summarize,
--replay) goes through here."""

import pickle
from pathlib import Path

import torch

from phase_controller import PHASES, phase_table

from .files import UserError, is_finite_number, one_line, open_regular_file, parse_json, read_text
from .model import base_lr_at
from .settings import ARMS, check_config, identity

# The arms of a seed, as the results files name them, and the accuracies compared between them.
BASELINE, PHASE_AWARE, CONTROL, BORROWED = ARMS
CONTROLS = {"lr-matched": CONTROL, "borrowed": BORROWED}  # --control's names for the arms it adds
CONTROLLED = (PHASE_AWARE, BORROWED)  # the arms a controller steers: they log its phase, dL and schedule
METRICS = ("best_acc", "final_acc")
STATUSES = ("ok", "diverged", "not_run")
# What the readers of a results file use from each arm's per-epoch log, and the phase arm's phase
# too (files from before a log was added still read); a checkpoint holds every log the arm keeps.
RESULTS_LOGS = ("train_loss", "eval_loss", "eval_acc", "lr")
# The logs an arm keeps from its first epoch (val_loss and val_acc join with --val-size).
ARM_LOGS = ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "steps", "train_seconds", "eval_seconds")

PHASE_ARM_LOGS = (*ARM_LOGS, "phase", "dL", "lr_mult", "accumulation")
WHOLE_LOGS = ("steps", "accumulation")  # counts; every other log but phase holds finite numbers
CHECKPOINT_PARTS = ("config", "next_epoch", "arm", "logged", "log_bytes", "model", "optimizer", "scheduler")


def without_timings(obj):
    """A results structure without its timings and output folder: what two runs of one command into
    two folders must share, value for value."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not k.endswith("_seconds") and k != "output_dir"}
    return [without_timings(v) for v in obj] if isinstance(obj, list) else obj


def results_path(folder, seed="*"):
    """A seed's results file; with the default seed, the pattern of every seed's."""
    return Path(folder) / f"results_seed_{seed}.json"


def checkpoint_path(folder, seed="*", name="*", suffix=".pt"):
    """The checkpoint of arm `name`; with a default, the pattern of every seed's or arm's; with
    suffix ".*", of its files (the checkpoint and its epoch log)."""
    return Path(folder) / f"checkpoint_seed_{seed}_{name}{suffix}"


def figure_path(folder, seed):
    return Path(folder) / f"figure_seed_{seed}.png"


def summary_path(folder, suffix):
    return Path(folder) / f"multi_seed_summary{suffix}"


def seeds_with_results(folder):
    """The seeds whose results file lies in folder."""
    prefix = results_path(folder, "").stem
    names = (path.stem.removeprefix(prefix) for path in Path(folder).glob(results_path(folder).name))
    return sorted(int(name) for name in names if name.isdigit())


def arms_of(config):
    """The arms a run with this config trains: baseline and phase arm, and the controls asked for."""
    asked = config["control"].split("+")
    return (BASELINE, PHASE_AWARE) + tuple(arm for name, arm in CONTROLS.items() if name in asked)


def delta_key(metric, other):
    """Where a results file keeps the phase arm's metric minus the other arm's."""
    return f"delta_{metric}" + ("" if other == BASELINE else f"_vs_{other}")


def paired_delta(results, other, metric):
    """phase_aware minus other on metric, or None unless both arms finished healthy."""
    a, b = results[PHASE_AWARE], results[other]
    return a[metric] - b[metric] if a["status"] == b["status"] == "ok" else None


def held_out_loss(log):
    """The loss the controller observes and selection uses: the validation split's with --val-size,
    else the test split's. log is one epoch's row or a whole per-epoch log."""
    return log["val_loss"] if "val_loss" in log else log["eval_loss"]


def arm_problem(record):
    """Why an arm is no evidence (diverged, or not run), or None when it finished healthy."""
    if record["status"] == "ok":
        return None
    if record["status"] == "diverged":
        return f"diverged in epoch {record['diverged_epoch'] + 1}"
    return f"not run: {record['reason']}"


def transition_key(phase):
    """How transition_epochs names a phase the controller entered: S1_BOUNDARY as "S1"."""
    return phase[:2]


DETECTED_PHASES = tuple(transition_key(phase) for phase in PHASES[1:])  # S1, S2, S3: what a controller detects


def transition_epoch(record, phase):
    """The epoch after which an arm's controller entered phase, or None."""
    return record.get("transition_epochs", {}).get(transition_key(phase))


class BadRecord(ValueError):
    """What is wrong with a record, said as the end of a sentence naming its file."""


def require(ok, message):
    if not ok:
        raise BadRecord(message)


def is_whole(value, minimum):
    return type(value) is int and value >= minimum


# ----- results files -----


def read_results_file(path, seed=None):
    """A results_seed_N.json, checked for shape (and for holding `seed`, when given)."""
    try:
        results = parse_json(read_text(path))
        check_results(results)
        require(seed is None or results["config"]["seed"] == seed, f"config's seed is not {seed}, its file name's")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not a results file this program can use ({e})") from None
    return results


def check_results(results):
    """BadRecord unless results has the shape a finished seed's results file has."""
    require(isinstance(results, dict) and isinstance(results.get("config"), dict), "no config")
    config = results["config"]
    check_settings(config)
    arms = arms_of(config)
    for name in arms:
        require(isinstance(results.get(name), dict), f"no {name} arm")
        check_record(results[name], name, RESULTS_LOGS, config["epochs"])
        check_accuracies(results[name], name)
    for name in CONTROLS.values():
        require(name in arms or name not in results, f"a {name} arm, but config's control is {config['control']!r}")


def check_settings(config):
    """The settings that define the run, each of its type and within the range its flag allows."""
    try:
        check_config(config)
    except ValueError as e:
        raise BadRecord(str(e)) from None


def check_record(record, name, logs, epochs, next_epoch=None):
    """An arm's record: its status and per-epoch logs agree with each other and with the epochs run.

    A results file's arm (next_epoch None) ran all epochs, or diverged before the end, or (the
    control) was not run; a checkpoint's arm has logged every epoch before next_epoch but one it
    diverged in.
    """
    status, log = record.get("status"), record.get("per_epoch")
    require(status in STATUSES and (status != "not_run" or name in CONTROLS.values()), f"{name} status {status!r}")
    require(isinstance(log, dict), f"{name} has no per_epoch log")
    required = logs + (("phase",) if name in CONTROLLED else ())
    missing = [key for key in required if key not in log]
    require(not missing, f"{name} per_epoch lacks {', '.join(missing)}")
    require(all(isinstance(values, list) for values in log.values()), f"{name} per_epoch holds a non-list")
    lengths = {len(values) for values in log.values()}
    require(len(lengths) == 1, f"{name} per_epoch lists differ in length")
    (done,) = lengths
    for key, values in log.items():
        check_log(name, key, values)
    if status == "ok":
        require(done == (epochs if next_epoch is None else next_epoch), f"{name} logs {done} epochs, not all of them")
    elif status == "diverged":
        diverged = record.get("diverged_epoch")
        expected = done < epochs if next_epoch is None else done == next_epoch - 1
        require(diverged == done and expected, f"{name} diverged_epoch {diverged!r} after {done} logged epochs")
    else:
        require(done == 0 and isinstance(record.get("reason"), str), f"{name} was not run but logs {done} epochs")
    lr_mult = record.get("fixed_lr_mult")
    if name not in CONTROLLED:  # a constant multiplier (the control's unknown when not run)
        require(is_finite_number(lr_mult) and lr_mult > 0 or status == "not_run", f"{name} fixed_lr_mult {lr_mult!r}")
    if name == BORROWED:
        require(is_whole(record.get("borrowed_from"), 0), f"{name} borrowed_from {record.get('borrowed_from')!r}")
    transitions = record.get("transition_epochs", {})
    require(
        isinstance(transitions, dict) and all(k in map(transition_key, PHASES[1:]) and is_whole(e, 0) and e < done
                                              for k, e in transitions.items()),
        f"{name} transition_epochs {transitions!r}",
    )  # fmt: skip


def check_log(name, key, values):
    if key == "phase":  # the controller only moves forward through the phases
        require(all(v in PHASES for v in values), f"{name} per_epoch phase holds a name not in {PHASES}")
        order = [PHASES.index(v) for v in values]
        require(order == sorted(order), f"{name} per_epoch phase goes back to an earlier phase")
    elif key in WHOLE_LOGS:
        require(all(is_whole(v, 1) for v in values), f"{name} per_epoch {key} holds a value not an integer >= 1")
    else:
        require(all(is_finite_number(v) for v in values), f"{name} per_epoch {key} holds a value not a finite number")


def check_accuracies(record, name):
    """A finished arm's best and final accuracy, present exactly when it logged an epoch."""
    done = len(record["per_epoch"]["eval_acc"])
    for key in ("best_acc", "final_acc"):
        require(
            is_finite_number(record.get(key)) if done else record.get(key) is None, f"{name} {key} {record.get(key)!r}"
        )
    best = record.get("best_epoch")
    require(is_whole(best, 0) and best < done if done else best is None, f"{name} best_epoch {best!r}")


# ----- checkpoints -----


def epoch_log_path(checkpoint):
    """The epoch log beside a checkpoint: one JSON row per logged epoch, appended as they come, so
    that a checkpoint's cost does not grow with the epochs."""
    return Path(checkpoint).with_suffix(".jsonl")


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's state, read with torch's weights_only loader (tensors and plain values only),
    its arm's per-epoch log read back from the epoch log beside it. OSError when a file cannot be
    read; BadRecord when one is not what a run writes."""
    try:
        with open_regular_file(path) as f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:  # torch's own message advises weights_only=False, the unsafe way out
        if "global" not in str(e).lower():  # not a refusal of a class or function it names: not a torch file
            raise BadRecord("not a checkpoint torch can read (not a torch file)") from None
        raise BadRecord("it holds Python objects other than tensors and plain values, which are never loaded") from None
    except Exception as e:  # truncated or not a torch file: torch raises RuntimeError and more
        raise BadRecord(f"not a checkpoint torch can read ({one_line(e)})") from None
    record = state.get("arm") if isinstance(state, dict) else None
    if isinstance(record, dict) and isinstance(record.get("per_epoch"), dict):  # else check_checkpoint says why
        logged, size = state.get("logged"), state.get("log_bytes")
        require(is_whole(logged, 0) and is_whole(size, 0), "no count of the epochs in its epoch log")
        record["per_epoch"] = read_epoch_log(epoch_log_path(path), list(record["per_epoch"]), logged, size)
    return state


def read_epoch_log(path, keys, logged, size):
    """{key: values} of the first `logged` rows of an epoch log, which fill its first `size` bytes."""
    try:
        with open_regular_file(path) as f:
            data = f.read(size)
    except FileNotFoundError:
        require(size == 0, f"its epoch log {path.name} is missing")
        data = b""
    require(len(data) == size, f"its epoch log {path.name} holds {len(data)} of the {size} bytes it had")
    try:
        rows = [parse_json(line) for line in data.decode().splitlines()]
    except ValueError as e:  # not UTF-8, or not JSON
        raise BadRecord(f"its epoch log {path.name} is not what a run writes ({one_line(e)})") from None
    require(len(rows) == logged and all(isinstance(row, dict) for row in rows), f"its epoch log {path.name} "
            f"holds {len(rows)} rows where {logged} epochs were logged")  # fmt: skip
    return {key: [row.get(key) for row in rows] for key in keys}


def check_checkpoint(state, name, seed):
    """(next_epoch, record) of the checkpoint of seed's arm `name`, its parts agreeing with each other
    and with its config: the arm logged every epoch before next_epoch (but one it diverged in), the
    scheduler stepped as often, its LRs are the base schedule's at next_epoch times the multiplier
    the phase (or the constant) asks, and the phase arm's controller saw the losses the log records."""
    missing = [part for part in CHECKPOINT_PARTS if not isinstance(state, dict) or part not in state]
    require(not missing, f"not a whole checkpoint: it lacks {missing}")
    require(isinstance(state["config"], dict), "no config")
    check_settings(state["config"])
    config, settings = state["config"], identity(state["config"])
    require(config["seed"] == seed, f"its config's seed is {config['seed']}, not its file name's {seed}")
    epochs = config["epochs"]
    next_epoch, record, scheduler = state["next_epoch"], state["arm"], state["scheduler"]
    require(is_whole(next_epoch, 1) and next_epoch <= epochs, f"next_epoch {next_epoch!r} not in 1..{epochs}")
    require(isinstance(record, dict), "no arm record")
    check_record(record, name, PHASE_ARM_LOGS if name in CONTROLLED else ARM_LOGS, epochs, next_epoch)
    require(isinstance(scheduler, dict), "no scheduler state")
    require(scheduler.get("last_epoch") == next_epoch, f"the scheduler stepped {scheduler.get('last_epoch')!r} "
            f"times in {next_epoch} epochs")  # fmt: skip
    controller, log = scheduler.get("controller"), record["per_epoch"]
    if name in CONTROLLED:
        require(isinstance(controller, dict), f"no controller in the {name} arm")
        window = settings["dl_window"] + 1
        seen = (controller.get("recent_losses"), controller.get("epochs_seen"))
        require(seen == (log["train_loss"][-window:], len(log["train_loss"])), "its controller did not see the "
                "training losses its log records")  # fmt: skip
        last = log["phase"][-1] if log["phase"] else controller.get("phase")
        require(controller.get("phase") == last, "its controller's phase is not the last one logged")
        asked = phase_table(settings["lr_pulse"], settings["grad_accum"]).get(last)
    else:
        require(controller is None, f"a controller in the {name} arm")
        asked = (record.get("fixed_lr_mult"), 1)
    require(
        (scheduler.get("lr_mult"), scheduler.get("accumulation")) == tuple(asked or ()),
        "its multiplier "
        f"and accumulation ({scheduler.get('lr_mult')}, {scheduler.get('accumulation')}) are not what its arm asks",
    )
    base = base_lr_at(next_epoch, config["base_lr"], config["warmup_epochs"], epochs)
    require(scheduler.get("unscaled_lrs") == [base], f"its LRs {scheduler.get('unscaled_lrs')} are not the base "
            f"schedule's {base} at epoch {next_epoch + 1}")  # fmt: skip
    return next_epoch, record
