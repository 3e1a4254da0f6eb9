"""Arms trained at once, in threads: the same results as one at a time, a seed written as soon as its
arms are done, and an interrupt or an arm's failure that stops every arm with its checkpoints
intact, so that --resume finishes the run with the numbers of an uninterrupted one."""

import errno
import re
import signal
import threading
from pathlib import Path

import pytest
from helpers import TINY, files_left, one_line_error, results_files, run_main

from phase_cifar10 import data, devices, files, launch, training
from phase_cifar10.settings import Settings

# Two seeds, three arms each, every phase visited: six arms, of which the controls wait for their phase arm.
RUN = [*TINY, "--epochs", "4", "--s2-threshold", "1.0", "--s3-patience", "1", "--control", "lr-matched",
       "--val-size", "64", "--seeds", "1,2", "--grad-accum", "2"]  # fmt: skip
RESULTS = ["results_seed_1.json", "results_seed_2.json", "multi_seed_summary.json"]


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_at_a_time")
    code, stdout, stderr = run_main([*RUN, "--output-dir", out])
    assert code == 0, stderr
    results = results_files(out)
    assert sorted(results) == sorted(RESULTS)
    return results, stdout


@pytest.mark.parametrize("at_once", [2, 6])
def test_arms_at_once_give_the_results_of_one_at_a_time(tmp_path, one_at_a_time, at_once):
    code, stdout, stderr = run_main([*RUN, "--output-dir", tmp_path, "--concurrent-arms", at_once])
    assert code == 0, stderr
    assert results_files(tmp_path) == one_at_a_time[0]
    assert f"up to {at_once} arms at once" in stdout and "up to" not in one_at_a_time[1]
    # A control never starts before its phase arm has ended.
    lines = stdout.splitlines()
    for seed in (1, 2):
        last_phase = max(i for i, line in enumerate(lines) if line.startswith(f"seed {seed} phase_aware epoch"))
        first_control = min(i for i, line in enumerate(lines) if line.startswith(f"seed {seed} control"))
        assert last_phase < first_control


def test_one_at_a_time_trains_seed_by_seed_in_arm_order(one_at_a_time):
    lines = one_at_a_time[1].splitlines()
    order = [tuple(line.split()[1:3]) for line in lines if re.match(r"seed \d+ \w+ +epoch", line)]
    expected = [(s, a) for s in ("1", "2") for a in ("baseline", "phase_aware", "control") for _ in range(4)]
    assert order == expected
    # Seed 1's results are written before seed 2 starts.
    written = next(i for i, line in enumerate(lines) if line.startswith("seed 1: wrote"))
    assert written < next(i for i, line in enumerate(lines) if re.match(r"seed 2 baseline +epoch", line))


def stop_in(monkeypatch, seed, arm, after_epoch, how):
    """Stop the run as `how` would once the arm has checkpointed after_epoch: Ctrl-C (a SIGINT to the
    main thread, as a terminal sends it), or the disk filling up during its next checkpoint."""
    save, replace = training.Arm.save, files.os.replace

    def save_then_interrupt(self, next_epoch):
        save(self, next_epoch)
        if (self.job.seed, self.name, next_epoch) == (seed, arm, after_epoch):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def replace_on_a_full_disk(source, target):
        if (
            Path(target).name == f"checkpoint_seed_{seed}_{arm}.pt"
            and saved.append(1) is None
            and len(saved) > after_epoch
        ):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, target)

    saved = []
    if how == "ctrl-c":
        monkeypatch.setattr(training.Arm, "save", save_then_interrupt)
    else:
        monkeypatch.setattr(files.os, "replace", replace_on_a_full_disk)


@pytest.mark.parametrize("how", ["ctrl-c", "full disk"])
def test_a_stop_while_arms_train_at_once_loses_nothing_and_resume_equals_an_uninterrupted_run(
    tmp_path, monkeypatch, one_at_a_time, how
):
    stop_in(monkeypatch, seed=1, arm="phase_aware", after_epoch=2, how=how)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path, "--concurrent-arms", 6])
    if how == "ctrl-c":
        assert code == 130 and "--resume" in stderr
    else:
        one_line_error(code, stderr, "No space left on device")
    assert not any(name.startswith("results_") for name in files_left(tmp_path))  # no seed had all its arms
    checkpoints = [name for name in files_left(tmp_path) if name.endswith(".pt")]
    assert "checkpoint_seed_1_phase_aware.pt" in checkpoints and len(checkpoints) == 4  # no control started
    monkeypatch.undo()
    code, stdout, stderr = run_main([*RUN, "--output-dir", tmp_path, "--concurrent-arms", 6, "--resume"])
    assert code == 0, stderr
    assert "resumed after epoch" in stdout
    assert results_files(tmp_path) == one_at_a_time[0]


def test_the_data_goes_onto_the_device_once_for_every_seed_that_trains_on_it(tmp_path):
    settings = Settings.from_command_line([*RUN, "--output-dir", str(tmp_path)])
    launch_ = launch.Launch(settings, devices.pick_device("cpu"), "fp32", tmp_path)
    dataset = data.synthetic_dataset(0)  # two seeds on the same images, as on CIFAR-10
    plans = {seed: launch.plan_seed(launch_, seed)._replace(data=dataset) for seed in (1, 2)}
    jobs = launch.seed_jobs(launch_, plans, progress=None)
    assert jobs[0].train is jobs[1].train and jobs[0].test is jobs[1].test and jobs[0].val is jobs[1].val
    assert jobs[0].train is not jobs[0].val
    own = launch.seed_jobs(launch_, {seed: launch.plan_seed(launch_, seed) for seed in (1, 2)}, None)
    assert own[0].train is not own[1].train  # synthetic data: each seed makes its own
