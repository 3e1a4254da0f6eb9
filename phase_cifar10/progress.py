"""Progress on the console: the ETA over a whole run, and a terminal's self-updating batch line."""

import sys
import time

import torch


class Progress:
    """Epochs done and an ETA over all the epochs this process still has to train."""

    def __init__(self, total_epochs):
        self.total, self.done, self.seconds = total_epochs, 0, 0.0

    def skip(self, epochs):  # epochs restored from a checkpoint, or never run (divergence)
        self.total -= epochs

    def epoch_done(self, seconds):
        self.done += 1
        self.seconds += seconds

    def eta(self):
        left = max(self.total - self.done, 0) * self.seconds / max(self.done, 1)
        return f"{int(left // 60)}m{int(left % 60):02d}s"


def show_batches(batches, total, label, stream=None):
    """The batches, unchanged. On a terminal one self-updating line shows batches done, images/s
    and the epoch's ETA while they are consumed; in a pipe or a log file nothing is added."""
    stream = stream or sys.stdout
    if not stream.isatty():
        yield from batches
        return
    start = last = time.perf_counter()
    images = 0
    for done, (x, y) in enumerate(batches, 1):
        yield x, y  # resumes once the batch is queued for training
        images += len(y)
        now = time.perf_counter()
        if now - last >= 0.5 or done == total:
            # An accelerator runs behind the host: wait until the batches counted are trained, so that
            # images/s is what was computed, not what was queued. Only when a line is drawn.
            if synchronize(y.device):
                now = time.perf_counter()
            eta = (total - done) * (now - start) / done
            stream.write(f"\r{label}  batch {done}/{total}  {images / (now - start):.0f} img/s  ETA {eta:.0f}s\033[K")
            stream.flush()
            last = now
    stream.write("\r\033[K")  # the epoch's own line takes its place


def synchronize(device):
    """Wait for the device's queued work; whether there was a queue to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return device.type in ("cuda", "mps")
