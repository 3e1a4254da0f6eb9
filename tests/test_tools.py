"""The GPU calls' scripts in tools/, rehearsed on the CPU with a tiny synthetic run: a GPU's time is
too scarce to find a broken script there. Each ends in a table; the table must say what the files
it read say."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ALL_PHASES, ROOT, TINY, row_cells, table_lines

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")), reason="needs bash, timeout")

# The scripts' flags come first; these later ones win: two seeds of the tiny run, a small split,
# thresholds that make the arms differ (so a table with its columns mixed up shows it).
FLAGS = [*TINY, *ALL_PHASES, "--seeds", "1,2", "--val-size", "64"]


def script(tmp_path, name, *args):
    """tools/NAME run by bash as the GPU call runs it, its python3 this test's interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python3 = bin_dir / "python3"  # a wrapper, not a link: a link would leave a virtual environment
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", str(ROOT / "tools" / name), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)


def test_the_reproduction_script_publishes_a_folder_and_its_table_says_what_its_files_say(tmp_path):
    out = tmp_path / "default"
    done = script(tmp_path, "gpu_reproduce.sh", tmp_path / "no-data", out, *FLAGS)
    assert done.returncode == 0, done.stderr
    printed = table_lines(done.stdout)  # the table the summary writes, for the seeds that finished
    assert printed == table_lines((out / "multi_seed_summary.md").read_text())
    for seed in (1, 2):
        results = json.loads((out / f"results_seed_{seed}.json").read_text())
        finals = [f"{results[arm]['final_acc']:.2f}" for arm in ("baseline", "phase_aware", "control")]
        row = next(row_cells(line) for line in printed if line.startswith(f"| {seed} |"))
        assert row[1:4] == finals and len(set(finals)) > 1
        entered = results["phase_aware"]["transition_epochs"]  # S1, S2, S3: after the epoch, counted from 1
        assert row[6:] == [str(entered[phase] + 1) if phase in entered else "never" for phase in ("S1", "S2", "S3")]
    assert "run: exit code 0," in done.stdout and "summary over seeds [1, 2]" in done.stdout
    assert "2 results files; summary file written" in done.stdout
    assert {"log.txt", "machine.txt", "multi_seed_summary.json"} <= {p.name for p in out.iterdir()}


CHECKS = ("the fast path equals eager", "a second run equals eager", "no NaN fills equals eager",
          "every concurrency equals one at a time")  # fmt: skip


def test_the_check_script_finds_the_fast_path_and_the_reruns_equal_on_the_cpu(tmp_path):
    # The benchmark counts ops over at least five batches an epoch: 384 images, one epoch.
    flags = [*TINY, "--subset", "384", "--epochs", "1", "--warmup-epochs", "0", "--val-size", "64"]
    done = script(tmp_path, "gpu_check.sh", tmp_path / "no-data", tmp_path / "check", *flags)
    assert done.returncode == 0, done.stderr
    assert "benchmark exit code 0" in done.stdout
    assert all(f"check: {check}: yes" in done.stdout for check in CHECKS)
    assert "program, 3 results files; same command twice equal: yes" in done.stdout  # two seeds, the summary
    assert "program, --eager equal to the fast path: yes" in done.stdout
