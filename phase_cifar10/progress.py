"""Progress on the console: the ETA over a whole run, and a terminal's self-updating batch line."""

import sys
import threading
import time

import torch

ESTIMATE_AFTER_BATCHES = 20  # the speed of the first batches gives a run its first estimate
LONG_RUN_SECONDS = 120  # shorter runs print no estimate: their first epoch's ETA comes soon enough


class Progress:
    """Epochs done and an ETA over all the epochs this process still has to train, from the wall
    time so far (arms may train at once, in threads); an arm-epoch trains train_images and
    evaluates eval_images."""

    def __init__(self, total_epochs, train_images=0, eval_images=0):
        self.total, self.done, self.started = total_epochs, 0, time.perf_counter()
        self.train_images, self.eval_images, self.estimated = train_images, eval_images, False
        self.counting = threading.Lock()

    def skip(self, epochs):  # epochs restored from a checkpoint, or never run (divergence)
        with self.counting:
            self.total -= epochs

    def epoch_done(self):
        with self.counting:
            self.done += 1

    def eta(self):
        seconds = time.perf_counter() - self.started
        return duration(max(self.total - self.done, 0) * seconds / max(self.done, 1))

    def wants_estimate(self):
        """Whether the run's first epoch is under way and no estimate was printed yet."""
        return not (self.estimated or self.done)

    def estimate(self, images, seconds):
        """Once, before the run's first epoch ends: the run's time from the speed of its first batches,
        an evaluated image counted at a third of a trained one (a forward pass, no backward)."""
        if not self.wants_estimate() or not images or seconds <= 0:
            return
        self.estimated = True
        evaluation = 1 + self.eval_images / (3 * max(self.train_images, 1))
        total = self.total * self.train_images * seconds / images * evaluation
        if total >= LONG_RUN_SECONDS:
            print(f"first batches at {images / seconds:,.0f} images/s: about {duration(total)} for this run")


def seed_name(seed, run=""):
    """How the console names a seed; run ("NAME: ") begins it where several runs train together."""
    return f"{run}seed {seed}"


def duration(seconds):
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def show_batches(batches, total, label, estimate=None, stream=None):
    """The batches, unchanged. On a terminal one self-updating line shows batches done, images/s
    and the epoch's ETA while they are consumed; in a pipe or a log file nothing is added. After
    the first ESTIMATE_AFTER_BATCHES (or all, if fewer), estimate(images, seconds) is called once."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    start = last = time.perf_counter()
    images = 0
    for done, (x, y) in enumerate(batches, 1):
        yield x, y  # resumes once the batch is queued for training
        images += len(y)
        if estimate is not None and done == min(ESTIMATE_AFTER_BATCHES, total):
            synchronize(y.device)  # an accelerator runs behind the host: time what was computed
            if tty:
                stream.write("\r\033[K")
            estimate(images, time.perf_counter() - start)
            estimate = None
        now = time.perf_counter()
        if tty and (now - last >= 0.5 or done == total):
            # Wait until the batches counted are trained, so that images/s is what was computed, not
            # what was queued. Only when a line is drawn.
            if synchronize(y.device):
                now = time.perf_counter()
            eta = (total - done) * (now - start) / done
            stream.write(f"\r{label}  batch {done}/{total}  {images / (now - start):.0f} img/s  ETA {eta:.0f}s\033[K")
            stream.flush()
            last = now
    if tty:
        stream.write("\r\033[K")  # the epoch's own line takes its place


def synchronize(device):
    """Wait for the device's queued work; whether there was a queue to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return device.type in ("cuda", "mps")
