"""The console's progress: the live line on a terminal, nothing added in a pipe, the run's first estimate."""

import io

import pytest
import torch

from phase_cifar10 import progress

pytestmark = pytest.mark.fast


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal():
    batches = [(torch.zeros(4), torch.zeros(4)) for _ in range(3)]
    terminal = Terminal()
    assert list(progress.show_batches(iter(batches), 3, "seed 1 baseline", stream=terminal)) == batches
    text = terminal.getvalue()
    assert "\rseed 1 baseline  batch 3/3  " in text and " img/s  ETA 0s" in text and "\n" not in text
    assert text.endswith("\r\x1b[K")  # cleared for the epoch's own line


def test_no_progress_line_in_a_pipe():
    stream = io.StringIO()
    batches = [(torch.zeros(4), torch.zeros(4)) for _ in range(3)]
    assert list(progress.show_batches(iter(batches), 3, "x", stream=stream)) == batches and stream.getvalue() == ""


def test_the_first_batches_give_one_estimate_of_the_run(capsys):
    seen = []
    batches = [(torch.zeros(4), torch.zeros(4)) for _ in range(30)]
    list(progress.show_batches(iter(batches), 30, "x", estimate=lambda *a: seen.append(a), stream=io.StringIO()))
    assert len(seen) == 1 and seen[0][0] == 4 * progress.ESTIMATE_AFTER_BATCHES
    # 6 arm-epochs of 1,000 training and 300 evaluated images (a third of a training image's cost
    # each) at 10 images/s: 6 * (100 s + 10 s) = 11 minutes.
    run = progress.Progress(6, train_images=1000, eval_images=300)
    run.estimate(images=50, seconds=5.0)
    run.estimate(images=50, seconds=1.0)  # once only
    assert capsys.readouterr().out == "first batches at 10 images/s: about 11m00s for this run\n"
    short = progress.Progress(1, train_images=100, eval_images=0)
    short.estimate(images=100, seconds=1.0)  # a run of seconds needs no estimate
    assert capsys.readouterr().out == ""


class QueuedBatch:
    """Labels on an accelerator that runs behind the host: only their count and device matter here."""

    def __init__(self, n, device):
        self.n, self.device = n, torch.device(device)

    def __len__(self):
        return self.n


def test_progress_line_waits_for_the_accelerator_before_reading_the_clock(monkeypatch):
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", waits.append)
    batches = [(None, QueuedBatch(4, "cuda:0")) for _ in range(3)]
    terminal = Terminal()
    assert len(list(progress.show_batches(iter(batches), 3, "x", stream=terminal))) == 3
    drawn = terminal.getvalue().count("batch ")
    assert drawn >= 1 and waits == [torch.device("cuda:0")] * drawn  # once per line drawn, never per batch


def test_the_eta_is_the_wall_time_per_epoch_done_times_the_epochs_left(monkeypatch):
    # Arms train at once, so epochs' own seconds overlap: the wall clock is what the rest will take.
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    run = progress.Progress(total_epochs=12)
    run.skip(2)  # restored from checkpoints: 10 left to train
    for _ in range(4):  # four arms finish an epoch each in the same 30 seconds
        run.epoch_done()
    now[0] += 30.0
    assert run.eta() == "0m45s"  # 6 epochs left at 30 s per 4
