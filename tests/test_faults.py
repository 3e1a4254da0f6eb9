"""Never lose a run: kills, interrupts, resume, divergence, atomic files."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    ALL_PHASES,
    ROOT,
    TINY,
    cli,
    interrupt_after,
    leftover_temp_files,
    read_json,
    run_main,
    without_timings,
)

from phase_cifar10 import files, launch, training

RUN = [*TINY, *ALL_PHASES]


def start_and_signal(out, after_line, sig, delay=0.15):
    """Start a run, send sig shortly after a progress line containing after_line; (code, stdout, stderr)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "phase_controller.py"), *RUN, "--output-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps
        # that; the run under test must get the handler a terminal's process gets.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = []
    for line in process.stdout:
        seen.append(line)
        if after_line in line:
            time.sleep(delay)  # well into the next epoch's training
            process.send_signal(sig)
            break
    stdout, stderr = process.communicate()
    return process.returncode, "".join(seen) + stdout, stderr


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, default_run):
    # Killed in the phase arm's fifth epoch, with the controller in S2 and counting stale evaluations.
    code, _, _ = start_and_signal(tmp_path, "phase_aware epoch   4/6", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "results_seed_42.json").exists()
    checkpoint = torch.load(tmp_path / "checkpoint_seed_42_phase_aware.pt", weights_only=True)
    assert checkpoint["next_epoch"] in (4, 5) and checkpoint["scheduler"]["controller"]["phase"] == "S2_AXIS_LOCK"
    result = cli(*RUN, "--output-dir", tmp_path, "--resume")
    assert result.returncode == 0, result.stderr
    assert "seed 42 phase_aware: resumed after epoch" in result.stdout
    _, uninterrupted, _ = default_run
    assert without_timings(read_json(tmp_path / "results_seed_42.json")) == without_timings(uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure_seed_42.png", "results_seed_42.json"]
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly_with_a_resume_hint(tmp_path, sig):
    code, _, stderr = start_and_signal(tmp_path, "baseline    epoch   1/6", sig)
    assert code == 130
    assert "interrupted; every completed epoch is checkpointed" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_seed_42_baseline.jsonl",
        "checkpoint_seed_42_baseline.pt",
    ]
    assert torch.load(tmp_path / "checkpoint_seed_42_baseline.pt", weights_only=True)["next_epoch"] in (1, 2)


def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_epoch", interrupted)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path])
    assert code == 130 and "no epoch was completed, so there is nothing to resume" in stderr
    assert "--resume" not in stderr and "checkpointed" not in stderr


def test_in_process_interrupt_and_resume_equal_the_uninterrupted_run(tmp_path, monkeypatch, default_run):
    interrupt_after(monkeypatch, 8)  # in the phase arm's third epoch
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path])
    assert code == 130 and "--resume" in stderr
    monkeypatch.undo()
    code, stdout, stderr = run_main([*RUN, "--output-dir", tmp_path, "--resume"])
    assert code == 0, stderr
    assert "seed 42 phase_aware: resumed after epoch" in stdout
    _, uninterrupted, _ = default_run
    assert without_timings(read_json(tmp_path / "results_seed_42.json")) == without_timings(uninterrupted)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--epochs", "7"], "epochs 6 there, 7 now"),
        (["--s1-threshold", "-0.05"], "s1_threshold -0.02 there, -0.05 now"),
        (["--control", "lr-matched"], "control 'none' there, 'lr-matched' now"),
    ],
)
def test_resume_with_changed_settings_is_refused(tmp_path, monkeypatch, change, message):
    interrupt_after(monkeypatch, 2)
    assert run_main([*RUN, "--output-dir", tmp_path])[0] == 130
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, stdout, stderr = run_main([*RUN, *change, "--output-dir", tmp_path, "--resume"])
    assert code == 2 and "checkpoint_seed_42_baseline.pt was made with other settings" in stderr
    assert message in stderr and stderr.count("\n") == 1 and " epoch " not in stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.fixture
def killed_before_the_results_file(tmp_path, monkeypatch):
    """A run interrupted after its figure was drawn but before its results file was written."""
    write_json = launch.write_json

    def interrupted_at_results(path, obj):
        if path.name.startswith("results_seed_"):
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(launch, "write_json", interrupted_at_results)
    assert run_main([*RUN, "--output-dir", tmp_path])[0] == 130
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_seed_42_baseline.jsonl", "checkpoint_seed_42_baseline.pt", "checkpoint_seed_42_phase_aware.jsonl",
        "checkpoint_seed_42_phase_aware.pt", "figure_seed_42.png",
    ]  # fmt: skip
    return tmp_path


def test_resume_writes_the_results_file_a_kill_prevented(killed_before_the_results_file, default_run):
    out = killed_before_the_results_file
    code, stdout, stderr = run_main([*RUN, "--output-dir", out, "--resume"])
    assert code == 0, stderr
    assert "/6  train" not in stdout  # no epoch trained again: all were done before the kill
    _, uninterrupted, _ = default_run
    assert without_timings(read_json(out / "results_seed_42.json")) == without_timings(uninterrupted)
    assert sorted(p.name for p in out.iterdir()) == ["figure_seed_42.png", "results_seed_42.json"]


def test_resume_redraws_a_missing_figure_and_drops_leftover_checkpoints(killed_before_the_results_file, default_run):
    # As if killed after the results file was written but before the figure and the checkpoints were
    # handled (the order of an older version): results present, figure missing, checkpoints left.
    out = killed_before_the_results_file
    default_out, _, _ = default_run
    shutil.copy(default_out / "results_seed_42.json", out)
    (out / "figure_seed_42.png").unlink()
    code, stdout, stderr = run_main([*RUN, "--output-dir", out, "--resume"])
    assert code == 0, stderr
    assert "skipped" in stdout and "redrew figure_seed_42.png" in stdout and "/6  train" not in stdout
    assert sorted(p.name for p in out.iterdir()) == ["figure_seed_42.png", "results_seed_42.json"]
    assert (out / "figure_seed_42.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_skips_a_finished_seed_and_refuses_one_finished_otherwise(tmp_path):
    assert run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path])[0] == 0
    results = tmp_path / "results_seed_42.json"
    stamp = results.stat().st_mtime_ns
    code, stdout, _ = run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path, "--resume"])
    assert code == 0 and "results_seed_42.json exists with these settings; skipped" in stdout
    assert " epoch " not in stdout and results.stat().st_mtime_ns == stamp
    code, _, stderr = run_main([*TINY, "--epochs", "3", "--width", "16", "--output-dir", tmp_path, "--resume"])
    assert code == 2 and "results_seed_42.json was made with other settings (width 4 there, 16 now)" in stderr


def test_a_fresh_start_over_an_earlier_run_refuses_and_restart_starts_afresh(tmp_path, monkeypatch):
    # The identical command rerun after an interrupt, as a requeued batch script runs it.
    interrupt_after(monkeypatch, 2)
    assert run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path])[0] == 130
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, stdout, stderr = run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path])
    assert code == 2 and stderr.count("\n") == 1 and stdout == ""
    assert "holds checkpoint_seed_42_baseline.jsonl, checkpoint_seed_42_baseline.pt of an earlier run" in stderr
    assert "--resume continues it" in stderr and "--restart" in stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing deleted
    code, stdout, _ = run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path, "--restart"])
    assert code == 0 and "resumed" not in stdout and stdout.count("baseline    epoch") == 3
    # A finished seed is never retrained by accident either.
    code, _, stderr = run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path])
    assert code == 2 and "holds results_seed_42.json of an earlier run" in stderr


def test_checkpoint_missing_a_part_is_a_clear_error(tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 2)
    assert run_main([*RUN, "--output-dir", tmp_path])[0] == 130
    monkeypatch.undo()
    path = tmp_path / "checkpoint_seed_42_baseline.pt"
    state = torch.load(path, weights_only=True)
    del state["scheduler"]
    torch.save(state, path)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path, "--resume"])
    assert code == 2 and stderr.count("\n") == 1
    assert f"cannot use {path}" in stderr and "lacks ['scheduler']" in stderr and "delete" not in stderr
    assert "--restart starts the seed afresh" in stderr


@pytest.mark.parametrize("garbage", [b"garbage", b"truncated", b"\x80\x02}q"])
def test_a_garbage_checkpoint_is_called_what_it_is(tmp_path, garbage):
    (tmp_path / "checkpoint_seed_42_baseline.pt").write_bytes(garbage)
    code, _, stderr = run_main([*TINY, "--output-dir", tmp_path, "--resume"])
    assert code == 2 and stderr.count("\n") == 1 and "checkpoint_seed_42_baseline.pt" in stderr
    assert "not a checkpoint torch can read" in stderr and "Python objects" not in stderr


def test_divergence_stops_the_arm_and_the_other_seeds_go_on(tmp_path):
    # A huge S1 pulse: the phase arm diverges in the first epoch that applies it, the one after S1
    # was detected (which epoch that is depends on floating-point details); the baseline is healthy.
    argv = [*TINY, "--lr-pulse", "100000", "--control", "lr-matched", "--multi-seed", "--seeds", "1,2"]
    code, stdout, stderr = run_main([*argv, "--output-dir", tmp_path])
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("error: 2 arm(s) diverged (seed 1 phase_aware in epoch ")
    for seed in (1, 2):
        results = read_json(tmp_path / f"results_seed_{seed}.json")
        assert results["baseline"]["status"] == "ok" and len(results["baseline"]["per_epoch"]["eval_acc"]) == 5
        phase = results["phase_aware"]
        diverged = phase["diverged_epoch"]
        assert phase["status"] == "diverged" and diverged == phase["transition_epochs"]["S1"] + 1
        assert len(phase["per_epoch"]["eval_acc"]) == diverged  # the healthy epochs before it
        assert phase["best_acc"] == max(phase["per_epoch"]["eval_acc"])
        control = results["control"]
        assert control["status"] == "not_run" and control["reason"] == f"phase_aware diverged in epoch {diverged + 1}"
        assert control["best_acc"] is None and control["per_epoch"]["eval_acc"] == []
        assert results["delta_final_acc"] is None and results["delta_final_acc_vs_control"] is None
        assert f"seed {seed} control: not run (phase_aware diverged in epoch {diverged + 1}" in stdout
        assert (tmp_path / f"figure_seed_{seed}.png").exists()
    summary = read_json(tmp_path / "multi_seed_summary.json")
    assert summary["arms"]["phase_aware"]["status"] == {"1": "diverged", "2": "diverged"}
    assert summary["comparisons"]["phase_aware_vs_baseline"]["pairs"] == 0
    assert [e["seed"] for e in summary["comparisons"]["phase_aware_vs_control"]["excluded"]] == [1, 2]
    assert (tmp_path / "multi_seed_summary.png").exists()
    assert not list(tmp_path.glob("checkpoint_*"))


def test_an_arm_diverged_at_its_first_epoch_still_gets_results_and_a_figure(tmp_path):
    code, _, stderr = run_main([*TINY, "--base-lr", "10000", "--output-dir", tmp_path])
    assert code == 1 and "diverged" in stderr
    results = read_json(tmp_path / "results_seed_42.json")
    assert results["baseline"]["diverged_epoch"] == 0 and results["baseline"]["best_acc"] is None
    assert results["delta_best_acc"] is None and (tmp_path / "figure_seed_42.png").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_atomic_write_leaves_the_old_file_and_no_temp_on_failure(tmp_path, monkeypatch, fault):
    target = tmp_path / "results.json"
    target.write_text("old")

    def fails_after_writing(*args):
        raise fault

    monkeypatch.setattr(files.os, "replace", fails_after_writing)
    with pytest.raises((KeyboardInterrupt, files.UserError)):
        files.write_atomically(target, b"new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_stale_temp_files_of_a_killed_run_are_removed_when_its_seed_starts(tmp_path):
    (tmp_path / ".checkpoint_seed_42_baseline.pt.tmp-99999").write_bytes(b"half")
    (tmp_path / ".results_seed_421.json.tmp-99999").write_bytes(b"another seed's")
    assert run_main([*TINY, "--epochs", "3", "--output-dir", tmp_path])[0] == 0
    assert leftover_temp_files(tmp_path) == [".results_seed_421.json.tmp-99999"]


# ----- one seed, one process -----

HOLD_LOCK = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from phase_cifar10 import launch
with launch.seed_lock(Path(sys.argv[2]), 42):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_seed_lock(out):
    """A process that holds seed 42's lock in out, as a training process does."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "held\n"
    return process


def test_a_second_process_on_the_seed_refuses_and_a_killed_ones_lock_blocks_nothing(tmp_path):
    holder = hold_seed_lock(tmp_path)
    try:
        for extra in ([], ["--resume"]):
            code, stdout, stderr = run_main([*TINY, "--output-dir", tmp_path, *extra])
            assert code == 2 and stderr.count("\n") == 1 and " epoch " not in stdout
            assert f"seed 42 is being trained in {tmp_path} by pid {holder.pid} on " in stderr
        assert run_main([*TINY, "--seed", "7", "--epochs", "1", "--output-dir", tmp_path])[0] == 0  # other seeds run
    finally:
        holder.kill()  # kill -9: no cleanup, its lock file stays behind
        holder.wait()
    assert (tmp_path / ".lock_seed_42").exists()
    code, _, stderr = run_main([*TINY, "--output-dir", tmp_path, "--resume"])
    assert code == 0, stderr
    assert not (tmp_path / ".lock_seed_42").exists()  # a finished seed removes its lock file
