"""Replay: the controller over a logged loss curve (a results file, a JSON list or a CSV), before training."""

import csv
import json
import math
from pathlib import Path
from typing import NamedTuple

from .figures import plot_replay
from .files import UserError, check_output_dir, is_finite_number, make_folder, parse_json, read_text, write_json
from .records import ARMS, PHASE_AWARE, check_results, held_out_loss
from .settings import CONTROLLER_DEFAULTS, controller_of, flag, identity


class LossLog(NamedTuple):
    train: list  # training loss per epoch
    eval: list | None  # eval loss per epoch (None where missing), or None
    phases: list | None  # phases a results file recorded, to compare with
    config: dict | None  # the settings a results file recorded


# Why a --replay file was read the way it was: its suffix decides.
READ_AS_CSV = "read as CSV because of its .csv suffix"
READ_AS_JSON = "read as JSON because its suffix is not .csv"


def read_loss_log(path, arm=PHASE_AWARE):
    """A LossLog from one arm of a results_seed_N.json, a JSON list of training losses, or a CSV
    with a train_loss column and an optional eval_loss column (as spreadsheets export them too).
    The suffix decides: .csv is read as CSV, anything else as JSON."""
    path = Path(path)
    as_csv = path.suffix.lower() == ".csv"
    how = READ_AS_CSV if as_csv else READ_AS_JSON
    try:
        text = read_text(path)
        if not text.strip():
            raise ValueError("the file is empty")
        if as_csv:
            log = read_csv_losses(text)
        else:
            try:
                data = parse_json(text)
            except ValueError as e:
                raise ValueError(f"{how}, but it is not JSON ({e}); for a CSV, name it .csv") from None
            log = read_json_losses(data, arm)  # its losses checked there, a results file's by check_results
    except OSError as e:
        raise UserError(f"--replay {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"--replay {path}: {e}") from None
    return log


def read_csv_losses(text):
    """Names and values may carry spaces and quotes; an empty eval_loss cell means no evaluation."""
    try:
        rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines()) if any(c.strip() for c in row)]
    except csv.Error as e:  # a cell beyond csv's field size limit, say
        raise ValueError(f"{READ_AS_CSV}, but it is not CSV this program reads ({e})") from None
    if not rows or "train_loss" not in rows[0]:
        found = ", ".join(rows[0]) if rows else "only separators"
        raise ValueError(f"{READ_AS_CSV}: needs a train_loss column in its header, found {found}")
    header, rows = rows[0], rows[1:]
    if not rows:
        raise ValueError("no rows under the header")

    def column(name, required):
        at, values = header.index(name), []
        for number, row in enumerate(rows, 1):
            cell = row[at] if at < len(row) else ""
            if not cell and required:
                raise ValueError(f"row {number} has no {name}")
            try:
                values.append(float(cell) if cell else None)
            except ValueError:
                raise ValueError(f"row {number}: {name} {cell!r} is not a number") from None
            if values[-1] is not None and not math.isfinite(values[-1]):
                raise ValueError(f"{READ_AS_CSV}: losses must be finite numbers")
        return values

    eval_losses = column("eval_loss", required=False) if "eval_loss" in header else None
    return LossLog(column("train_loss", required=True), eval_losses, None, None)


def read_json_losses(data, arm):
    if isinstance(data, list):
        if not data:
            raise ValueError("no losses in it")
        wrong = next((i for i, v in enumerate(data) if not is_finite_number(v)), None)
        if wrong is not None:
            raise ValueError(f"item {wrong} of the list is {shorten(json.dumps(data[wrong]))}, not a finite number")
        return LossLog([float(v) for v in data], None, None, None)
    if not (isinstance(data, dict) and isinstance(data.get(PHASE_AWARE), dict) and "config" in data):
        raise ValueError("expected a results_seed_N.json file or a JSON list of numbers")
    check_results(data)
    if arm not in data:
        raise ValueError(f"it holds no {arm} arm, only {', '.join(a for a in ARMS if a in data)} (--replay-arm)")
    log = data[arm]["per_epoch"]
    if not log["train_loss"]:
        raise ValueError(f"no losses in its {arm} arm")
    # Only the phase arm's phases are its controller's over this curve: the others have none, or borrowed ones.
    phases = log["phase"] if arm == PHASE_AWARE else None
    return LossLog(log["train_loss"], held_out_loss(log), phases, data["config"])


def shorten(text, limit=60):
    return text if len(text) <= limit else text[: limit - 3] + "..."


def replay(settings):
    """--replay: the controller over a logged loss curve, printed, compared and written out."""
    check_output_dir(settings.output_dir)
    source, arm = settings.replay, settings.replay_arm
    log, controller = read_loss_log(source, arm), controller_of(settings.controller)
    if log.config is None and arm != PHASE_AWARE:
        raise UserError(f"--replay {source}: --replay-arm picks an arm of a results file; this file holds one curve")
    at = next((e for e, loss in enumerate(log.train) if loss <= 0), None)
    if controller.dl_mode == "relative" and at is not None:
        raise UserError(
            f"--replay {source}: --dl-mode relative needs positive losses; epoch {at + 1} has {log.train[at]}"
        )
    print(f"replaying {len(log.train)} epochs of {source}" + ("" if log.config is None else f", its {arm} arm"))
    rows = replay_rows(log, controller, source)
    if log.phases is not None:
        print(compare_with_recorded(rows, log, settings))
    # The phase arm's replay keeps the file's name; another arm's adds the arm's.
    out, stem = Path(settings.output_dir), Path(source).stem + ("" if arm == PHASE_AWARE else f"_{arm}")
    replay_result = {
        "source": str(source),
        "arm": None if log.config is None else arm,
        "controller": dict(settings.controller),
        "per_epoch": rows,
        "transitions": controller.transitions,
        "transition_epochs": controller.transition_epochs,
    }
    make_folder(out, "--output-dir")
    # The figure first, as a seed's is drawn before its results file; a name that is not UTF-8 is
    # shown escaped in its title.
    title = str(source).encode("utf-8", "backslashreplace").decode("utf-8")
    plot_replay(rows, controller, out / f"replay_{stem}.png", title=title)
    write_json(out / f"replay_{stem}.json", replay_result, indent=None)  # a row per epoch: long logs write fast
    print(f"wrote {out / f'replay_{stem}.json'} and {out / f'replay_{stem}.png'}")
    return 0


def replay_rows(log, controller, source):
    """Observe every logged epoch, printing a table row each; the rows, then the transitions."""
    print("epoch  train_loss  eval_loss        dL  phase          next lr_mult  next accum")
    rows = []
    for epoch, loss in enumerate(log.train):
        eval_loss = log.eval[epoch] if log.eval else None
        try:
            lr_mult, accumulation = controller.observe(loss, eval_loss)
        except ValueError as e:  # a slope that overflows
            raise UserError(f"--replay {source}: epoch {epoch + 1}: {e}") from None
        row = {"epoch": epoch, "train_loss": loss, "eval_loss": eval_loss, "dL": controller.dL,
               "phase": controller.phase, "lr_mult": lr_mult, "accumulation": accumulation}  # fmt: skip
        rows.append(row)
        shown = "" if eval_loss is None else f"{eval_loss:.4f}"
        print(
            f"{epoch + 1:>5}  {loss:10.4f}  {shown:>9}  {controller.dL:+.5f}  {controller.phase:<13}"
            f"  {lr_mult:12.2f}  {accumulation:10d}"
        )
    for line in controller.transitions:
        print(f"transition {line}")
    return rows


def compare_with_recorded(rows, log, settings):
    """Whether the replayed phases are the ones a results file recorded; if not, where and which flags differ."""
    mismatched = [e for e, (row, phase) in enumerate(zip(rows, log.phases, strict=True)) if row["phase"] != phase]
    if not mismatched:
        return "matches the phases recorded in the file"
    recorded = identity(log.config)
    used = [f"{flag(k)} {recorded[k]}" for k in CONTROLLER_DEFAULTS if recorded[k] != settings.controller[k]]
    hint = f"; the run used {' '.join(used)}" if used else ""
    return f"differs from the recorded phases after epochs {[e + 1 for e in mismatched]}{hint}"
