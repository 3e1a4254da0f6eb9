"""Windows and their replay: which windows run eagerly and which replay a captured step, and that a
replay computes what the eager window would, bit for bit. On the CPU the capture is
steps.run_eagerly, whose replay runs the captured work again on the graph's inputs; so what is
checked here is the windowing, the graph's inputs and the copies into them. The CUDA graph itself
is checked on a GPU by the benchmark's --check."""

import copy
from contextlib import nullcontext

import pytest
import torch

from phase_cifar10 import data, loader, model, steps


class CountedCapture:
    """steps.run_eagerly, counting captures and replays."""

    def __init__(self):
        self.captures = self.replays = 0

    def __call__(self, work):
        self.captures += 1

        def replay():
            self.replays += 1
            work()

        return replay


def test_the_first_window_and_windows_of_other_shapes_run_eagerly_the_rest_replay_one_capture():
    ran = []
    capture = CountedCapture()

    def step(window):
        ran.append([len(y) for _, y in window])

    def batch(n):
        return torch.zeros(n, 2), torch.zeros(n)

    windows = [[batch(4), batch(4)]] * 4 + [[batch(4), batch(1)], [batch(4)]]
    assert steps.run_windows(step, windows, capture) == (6, 4 * 8 + 5 + 4)
    # Eager: the first window, then the two short ones. Replayed: windows 2, 3 and 4, from one capture.
    assert (capture.captures, capture.replays) == (1, 3)
    assert ran == [[4, 4], [4, 4], [4, 4], [4, 4], [4, 1], [4]]  # the replays ran the step on the graph's inputs
    ran.clear()
    assert steps.run_windows(step, windows) == (6, 41) and len(ran) == 6  # no capture: every window eagerly


def test_windows_group_micro_batches_the_last_window_may_be_short():
    assert [len(w) for w in steps.windows(range(7), 3)] == [3, 3, 1]
    assert [len(w) for w in steps.windows(range(6), 3)] == [3, 3]
    assert [len(w) for w in steps.windows(range(2), 1)] == [1, 1]


@pytest.mark.parametrize("accumulation", [1, 3])
def test_replayed_epochs_equal_eager_ones_bit_for_bit(accumulation):
    # The narrow ResNet with BatchNorm, channels_last off (the CPU layout at this width), 11 batches
    # the last one short, over three epochs: momentum buffers and BatchNorm statistics carry over.
    dataset = data.synthetic_dataset(3)
    split = loader.DeviceSplit(
        dataset.train_x[:330], dataset.train_y[:330], torch.device("cpu"), torch.contiguous_format
    )
    eager = model.build_model(4, 3, torch.device("cpu"))
    replayed = copy.deepcopy(eager)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (eager, replayed)]
    capture = CountedCapture()
    for epoch in range(3):
        batches = list(split.train_batches(32, seed=3, epoch=epoch))
        expected = steps.train_epoch(eager, optimizers[0], batches, accumulation, nullcontext())
        got = steps.train_epoch(replayed, optimizers[1], batches, accumulation, nullcontext(), capture)
        assert got == expected
    full = 10 // accumulation  # windows of full-size batches: 10 of 32 images, then one of 10
    assert capture.captures == 3 and capture.replays == 3 * (full - 1)  # the first and the short window eager
    for a, b in zip(eager.state_dict().values(), replayed.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # weights, BatchNorm statistics and counts
    buffers = [[s["momentum_buffer"] for s in opt.state.values()] for opt in optimizers]
    assert all(torch.equal(a, b) for a, b in zip(*buffers, strict=True))
    with torch.no_grad():
        assert steps.evaluate(eager, split, nullcontext()) == steps.evaluate(replayed, split, nullcontext(), capture)


def test_an_epoch_of_one_window_never_captures():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    capture = CountedCapture()
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    assert steps.train_epoch(net, optimizer, [(x, y)], 2, nullcontext(), capture)[2] == 1
    assert capture.captures == 0
