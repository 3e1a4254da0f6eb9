"""The controller where users train: ranks kept in step under torch.distributed."""

import subprocess
import sys

import pytest
from helpers import ROOT, read_json

import phase_controller as pc

sys.path.insert(0, str(ROOT / "tests"))
from ranks_in_step import EVAL_LOSSES, LOSSES, SETTINGS, decisions  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two real processes (torchrun, gloo, CPU) decided: [rank 0, rank 1]."""
    out = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(ROOT / "tests" / "ranks_in_step.py"), str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [read_json(out / f"rank_{rank}.json") for rank in (0, 1)]


def test_without_syncing_the_ranks_split(two_ranks):
    # Each rank on its own curve: rank 0's dL (1.8 - 2.0) / 2 = -0.1 passes s1_threshold -0.05 at
    # epoch 2; rank 1's first passes at epoch 5, (1.8 - 1.99) / 3 = -0.063. For three epochs the
    # ranks train the same replicated weights at different LRs.
    rank0, rank1 = (rank["unsynced"] for rank in two_ranks)
    assert rank0["transition_epochs"]["S1"] == 2 and rank1["transition_epochs"]["S1"] == 5
    assert rank0["lr"] != rank1["lr"]


def test_synced_ranks_decide_alike_and_as_one_controller_on_the_mean_curve(two_ranks):
    rank0, rank1 = (rank["synced"] for rank in two_ranks)
    assert rank0 == rank1
    # The mean curve 2.0, 1.95, 1.895, ...: dL (1.895 - 2.0) / 2 = -0.0525 < -0.05 at epoch 2, then
    # |(1.84 - 2.0) / 3| = 0.053 < 0.06 at epoch 3.
    assert rank0["transition_epochs"]["S1"] == 2 and rank0["transition_epochs"]["S2"] == 3
    mean_losses = [(a + b) / 2 for a, b in zip(*LOSSES, strict=True)]
    mean_evals = [(a + b) / 2 for a, b in zip(*EVAL_LOSSES, strict=True)]
    one = pc.PhaseController(**SETTINGS)
    for loss, eval_loss in zip(mean_losses, mean_evals, strict=True):
        one.observe(loss, eval_loss)
    assert rank0["transition_epochs"] == one.transition_epochs and rank0["phase"][-1] == one.phase


def test_one_process_is_unaffected_by_syncing():
    # Without an initialised process group both ways decide on the losses given.
    assert decisions(True, 0) == decisions(False, 0)
