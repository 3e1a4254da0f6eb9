"""The benchmark command runs on any machine and its checks hold: the fast path, a second run, no
NaN fills and every concurrency give the eager path's numbers. (Its timings are its output, not
asserted.)"""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

TINY_BENCH = ["--dataset", "synthetic", "--subset", "384", "--width", "4", "--batch-size", "64", "--device", "cpu",
              "--bf16", "off", "--arms", "1,2"]  # fmt: skip


def test_the_benchmark_prints_its_figures_and_its_checks_hold(tmp_path):
    done = cli_benchmark(*TINY_BENCH, "--check", "--json", tmp_path / "figures.json")
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert len(figures["checks"]) == 4 and all(figures["checks"].values())
    assert set(figures["at_once"]) == {"1", "2"}
    assert all(at_once["arm_epochs_per_second"] > 0 for at_once in figures["at_once"].values())
    assert figures["ops_per_step"]["fast"] == figures["ops_per_step"]["eager"] + 2  # on the CPU: plus the two copies
    lines = ("one arm, eager", "aten ops per optimizer step", "2 arm(s) at once", "check: the fast path equals eager")
    assert all(line in done.stdout for line in lines)


@pytest.mark.parametrize(
    "flags, message",
    [(["--width", "0"], "--width"), (["--arms", "1,x"], "--arms 1,x: give whole numbers"), (["--json"], "--json")],
)
def test_a_bad_flag_is_one_line(flags, message):
    done = cli_benchmark(*TINY_BENCH, *flags)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def cli_benchmark(*args):
    command = [sys.executable, "-m", "phase_cifar10.benchmark", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
