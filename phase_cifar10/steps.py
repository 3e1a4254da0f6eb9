"""What an epoch computes, window by window: the optimizer steps of training and the batches of an
evaluation, run eagerly or replayed from a CUDA graph.

Within an epoch the LR and the accumulation are fixed, so every full window (accumulation
micro-batches, then one optimizer step) launches the same kernels with the same arguments. On
CUDA the epoch's first window runs eagerly (on the first epoch it creates the momentum buffers,
and it initializes whatever CUDA does lazily); the next window shaped like it is captured as a
CUDA graph, and every such window replays it after copying its batches into the graph's inputs.
A window of another shape (the short last one) runs eagerly. A replay launches exactly the
kernels the eager window would, so the numbers are the same; the host's work per step becomes a
few copies and one launch. Graphs live one epoch: the next epoch's LR is another constant.
"""

import threading

import torch
import torch.nn.functional as F

from .files import UserError, one_line
from .model import EVAL_BATCH_SIZE, EVAL_BATCH_SIZE_CPU


def train_epoch(model, optimizer, batches, accumulation, autocast, capture=None):
    """One pass over batches; returns (mean per-sample loss, accuracy %, optimizer steps), the sums
    read from the device once. With capture (cuda_graph), windows shaped like the first replay a graph.

    With accumulation k the optimizer steps after every k micro-batches and after the last one of
    the epoch, so B micro-batches take ceil(B/k) steps. Every step uses the per-sample mean gradient
    over exactly the samples of its window: micro-batch losses are summed over samples and the
    window's gradient is divided by its sample count before the step. So a short last window (391
    batches with k=2) steps at full strength, and micro-batches of unequal size weigh by their size.
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums = running_sums(params[0].device)

    def train_window(window):
        for images, labels in window:
            with autocast:
                logits = model(images)
                loss = F.cross_entropy(logits, labels, reduction="sum")
            loss.backward()
            add_to_sums(sums, loss, logits, labels)
        # The window's summed gradient becomes its per-sample mean: one launch, not one per tensor.
        torch._foreach_div_([p.grad for p in params if p.grad is not None], sum(len(y) for _, y in window))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps, seen = run_windows(train_window, windows(batches, accumulation), capture)
    return float(sums[0]) / seen, 100.0 * float(sums[1]) / seen, steps


@torch.no_grad()
def evaluate(model, split, autocast, capture=None):
    """(mean per-sample loss, accuracy %) over a whole split."""
    model.eval()
    sums = running_sums(split.images.device)

    def eval_batch(window):
        [(images, labels)] = window
        with autocast:
            logits = model(images)
        add_to_sums(sums, F.cross_entropy(logits.float(), labels, reduction="sum"), logits, labels)

    batch_size = EVAL_BATCH_SIZE_CPU if split.images.device.type == "cpu" else EVAL_BATCH_SIZE
    run_windows(eval_batch, ([batch] for batch in split.eval_batches(batch_size)), capture)
    return float(sums[0]) / len(split), 100.0 * float(sums[1]) / len(split)


def running_sums(device):
    """The summed loss (fp32) and the count of correct predictions, kept on the device: no host sync per batch."""
    return torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device)


def add_to_sums(sums, loss, logits, labels):
    sums[0].add_(loss.detach().float())
    sums[1].add_((logits.argmax(1) == labels).sum())


def windows(batches, accumulation):
    """The batches in windows of `accumulation` micro-batches; the last window may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == accumulation:
            yield window
            window = []
    if window:
        yield window


def run_windows(step, windows, capture=None):
    """step(window) for each window; returns (windows, samples). With capture, the first window runs
    eagerly and those of its shapes after it replay one graph of step, captured at the second."""
    count = samples = 0
    first = replay = None
    for window in windows:
        shapes = [(x.shape, y.shape) for x, y in window]
        if capture is None or shapes != first:
            step(window)
            first = shapes if first is None else first
        else:
            replay = replay or Replayed(step, window, capture)
            replay(window)
        count, samples = count + 1, samples + sum(len(y) for _, y in window)
    return count, samples


class Replayed:
    """step captured once on copies of a window's tensors (the graph's inputs); each call copies its
    window into them and replays."""

    def __init__(self, step, window, capture):
        self.inputs = [(x.clone(), y.clone()) for x, y in window]
        self.replay = capture(lambda: step(self.inputs))

    def __call__(self, window):
        for (x_in, y_in), (x, y) in zip(self.inputs, window, strict=True):
            x_in.copy_(x)
            y_in.copy_(y)
        self.replay()


CAPTURING = threading.Lock()  # one capture at a time per process: arms train in threads


def cuda_graph(work):
    """work() captured as a CUDA graph on the current stream (not the default one); returns its replay.

    Capture records kernels without running them, so capturing moves no weight and no BatchNorm
    statistic. thread_local: other threads' arms keep launching and allocating while one captures.
    """
    graph = torch.cuda.CUDAGraph()
    with CAPTURING:
        try:
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                work()
            finally:
                graph.capture_end()
        except RuntimeError as e:
            raise UserError(
                f"capturing an epoch's CUDA graph failed ({one_line(e)}): --resume --eager continues without "
                "graphs, with the same numbers, more slowly"
            ) from e
    return graph.replay


def run_eagerly(work):
    """The stand-in for cuda_graph where there are no graphs: each replay runs work again (tests use
    it on the CPU to check the windows and the graph's inputs)."""
    return work
