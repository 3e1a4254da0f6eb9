"""Checkpoints: edited, damaged, renamed or unreadable ones refused before training in one line that
never advises deleting them; a kill or a full disk while saving loses nothing."""

import errno
from pathlib import Path

import pytest
import torch
from helpers import (
    ALL_PHASES,
    DELETE,
    RUN,
    TINY,
    edit,
    files_left,
    one_line_error,
    read_checkpoint,
    read_json,
    run_main,
    without_timings,
    write_checkpoint,
)

from phase_cifar10 import files, launch, records, training


@pytest.fixture
def interrupted_run(tmp_path, monkeypatch):
    """A run stopped after the phase arm's second epoch: its checkpoints in tmp_path."""
    real = training.Arm.save

    def save_then_stop(arm, next_epoch):
        real(arm, next_epoch)
        if arm.name == "phase_aware" and next_epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Arm, "save", save_then_stop)
    assert run_main([*RUN, "--output-dir", tmp_path])[0] == 130
    monkeypatch.undo()
    return tmp_path / "checkpoint_seed_42_phase_aware.pt"


CHECKPOINT_EDITS = [
    (("next_epoch",), 3, "phase_aware logs 2 epochs, not all of them"),
    (("next_epoch",), "2", "next_epoch '2' not in 1..3"),
    (("next_epoch",), 0, "next_epoch 0 not in 1..3"),
    (("arm", "per_epoch", "phase"), ["S0_EXPLORE"], "per_epoch phase holds a name not in"),  # a row without it
    (("arm", "per_epoch", "steps", 0), 0, "steps holds a value not an integer >= 1"),
    (("arm", "status"), "not_run", "phase_aware status 'not_run'"),
    (("scheduler", "last_epoch"), 5, "the scheduler stepped 5 times in 2 epochs"),
    (("scheduler", "controller", "recent_losses"), [1.0, 2.0], "its controller did not see the training losses"),
    (("scheduler", "controller", "phase"), "S3_POLISH", "its controller's phase is not the last one logged"),
    (("config", "dl_mode"), "weird", "config's dl_mode must be 'absolute' or 'relative'"),
    (("arm",), DELETE, "it lacks ['arm']"),
    # Parts that each look right but contradict each other: a silent wrong result if resumed.
    (("config", "seed"), 137, "its config's seed is 137, not its file name's 42"),
    (("scheduler", "lr_mult"), 50.0, "its multiplier and accumulation (50.0, 1) are not what its arm asks"),
    (("scheduler", "accumulation"), 4, "its multiplier and accumulation (1.0, 4) are not what its arm asks"),
    (("scheduler", "unscaled_lrs"), [0.1], "its LRs [0.1] are not the base schedule's 0.01 at epoch 3"),
]


@pytest.mark.parametrize("path, value, message", CHECKPOINT_EDITS, ids=[e[2][:30] for e in CHECKPOINT_EDITS])
def test_an_edited_checkpoint_is_refused_before_training(interrupted_run, path, value, message):
    state = read_checkpoint(interrupted_run)
    edit(state, path, value)
    write_checkpoint(interrupted_run, state)
    code, stdout, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    one_line_error(code, stderr, f"cannot use {interrupted_run}", message, "--restart starts the seed afresh")
    assert " epoch " not in stdout and "delete" not in stderr


def test_what_a_kill_left_after_the_checkpointed_epochs_is_cut_back(interrupted_run, tmp_path):
    log = interrupted_run.with_suffix(".jsonl")
    log.write_bytes(log.read_bytes() + b'{"train_loss": 1.0, "train_a')  # a kill in mid-append leaves this
    code, _, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    assert code == 0, stderr
    assert run_main([*RUN, "--output-dir", tmp_path / "whole"])[0] == 0
    resumed, whole = (
        read_json(folder / "results_seed_42.json") for folder in (interrupted_run.parent, tmp_path / "whole")
    )
    assert without_timings(resumed) == without_timings(whole)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda log: log.write_bytes(log.read_bytes()[:-5]), "of the"),
        (lambda log: log.unlink(), "is missing"),
        (lambda log: log.write_bytes(b"\xff" * 4096), "is not what a run writes"),
        (lambda log: log.write_bytes(log.read_bytes().replace(b"train_loss", b"train_lost")), "train_loss holds"),
    ],
    ids=["truncated", "missing", "garbage", "a column renamed"],
)
def test_a_damaged_epoch_log_is_refused_before_training(interrupted_run, damage, message):
    damage(interrupted_run.with_suffix(".jsonl"))
    code, stdout, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    one_line_error(code, stderr, f"cannot use {interrupted_run}", message, "--restart starts the seed afresh")
    assert " epoch " not in stdout


def test_a_checkpoint_renamed_to_another_seed_is_refused(interrupted_run):
    folder = interrupted_run.parent
    for path in folder.glob("checkpoint_seed_42_*"):
        path.rename(folder / path.name.replace("_42_", "_137_"))
    code, stdout, stderr = run_main([*RUN, "--seed", "137", "--output-dir", folder, "--resume"])
    one_line_error(code, stderr, "its config's seed is 42, not its file name's 137")
    assert " epoch " not in stdout and not (folder / "results_seed_137.json").exists()


def test_an_unreadable_checkpoint_names_its_permissions_never_deletion(interrupted_run, monkeypatch):
    opened = records.open_regular_file

    def denied(path):
        if Path(path) == interrupted_run:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path)

    monkeypatch.setattr(records, "open_regular_file", denied)
    code, _, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    one_line_error(code, stderr, f"cannot read {interrupted_run}: Permission denied", "fix its permissions")
    assert "delete" not in stderr and interrupted_run.exists()


@pytest.mark.parametrize(
    "part, change, message",
    [
        ("optimizer", lambda o: o["param_groups"][0].update(momentum=5.0), "its optimizer settings are not"),
        ("optimizer", lambda o: o["state"][0].update(momentum_buffer=torch.zeros(2)), "a momentum buffer of shape"),
        ("model", lambda m: m.update({"head.weight": torch.zeros(3, 3)}), "size mismatch"),
    ],
)
def test_a_checkpoint_whose_tensors_do_not_fit_the_arm_is_refused(interrupted_run, part, change, message):
    state = torch.load(interrupted_run, weights_only=True)
    change(state[part])
    torch.save(state, interrupted_run)
    code, _, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    one_line_error(code, stderr, f"cannot restore {interrupted_run}", message)


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_a_pickle_payload_checkpoint_is_refused_without_advising_the_unsafe_way(interrupted_run):
    torch.save({"config": Payload()}, interrupted_run)
    code, stdout, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    one_line_error(code, stderr, "holds Python objects other than tensors and plain values, which are never loaded")
    assert "weights_only" not in stderr and "ran" not in stdout


def test_an_interrupt_while_resume_checks_never_says_nothing_to_resume(interrupted_run, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "check_resumable", interrupted)
    code, _, stderr = run_main([*RUN, "--output-dir", interrupted_run.parent, "--resume"])
    assert code == 130 and "nothing to resume" not in stderr and "--resume" in stderr
    assert interrupted_run.exists()


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def fileno(self):
        return self.f.fileno()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch, default_run):
    # The disk fills while the third checkpoint is written (at width 16 and 32 torch's zip writer
    # once turned that into a RuntimeError of its own; the checkpoint is now serialized in memory).
    mkstemp, fdopen, full, saves = files.tempfile.mkstemp, files.os.fdopen, set(), []

    def counted_mkstemp(dir, prefix):
        fd, name = mkstemp(dir=dir, prefix=prefix)
        saves.append(prefix) if prefix.startswith(".checkpoint_seed_42_baseline.pt") else None
        full.add(fd) if len(saves) == 3 and prefix.startswith(".checkpoint_seed_42_baseline.pt") else None
        return fd, name

    monkeypatch.setattr(files.tempfile, "mkstemp", counted_mkstemp)
    monkeypatch.setattr(
        files.os, "fdopen", lambda fd, *a, **k: FullDisk(fdopen(fd, *a, **k)) if fd in full else fdopen(fd, *a, **k)
    )
    code, _, stderr = run_main([*TINY, *ALL_PHASES, "--output-dir", tmp_path])
    one_line_error(code, stderr, "cannot write", "checkpoint_seed_42_baseline.pt (No space left on device)")
    assert torch.load(tmp_path / "checkpoint_seed_42_baseline.pt", weights_only=True)["next_epoch"] == 2
    assert files_left(tmp_path) == ["checkpoint_seed_42_baseline.jsonl", "checkpoint_seed_42_baseline.pt"]
    monkeypatch.undo()
    assert run_main([*TINY, *ALL_PHASES, "--output-dir", tmp_path, "--resume"])[0] == 0
    _, uninterrupted, _ = default_run
    assert (
        read_json(tmp_path / "results_seed_42.json")["phase_aware"]["per_epoch"]["train_loss"]
        == (uninterrupted["phase_aware"]["per_epoch"]["train_loss"])
    )
