"""The controller where users train: ranks kept in step under torch.distributed."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, read_json, run_documented_code

import phase_controller as pc

sys.path.insert(0, str(ROOT / "tests"))
from ranks_in_step import EVAL_LOSSES, LOSSES, SETTINGS, decisions  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two real processes (torchrun, gloo, CPU) decided: [rank 0, rank 1]."""
    out = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the ranks import phase_controller from the checkout
    script = str(ROOT / "tests" / "ranks_in_step.py")
    result = subprocess.run([*command, script, str(out)], capture_output=True, text=True, env=env)
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


# ----- Lightning, with the docs' PhaseCallback -----


def lightning_run(tmp_path, devices):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "tests" / "lightning_run.py"), str(tmp_path), str(devices)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return [read_json(tmp_path / f"rank_{rank}.json") for rank in range(devices)]


# Both framework runs: 6 epochs of 5 micro-batches, thresholds that force S1 after epoch 2 and S2
# after epoch 3, so these multipliers are observed after each epoch.
MULTIPLIERS = [1.0, 1.0, 1.1, 0.5, 0.5, 0.5]


def lr_after(epoch):
    """The base LambdaLR 1 / (1 + 0.1 * step) on LR 0.1 is stepped per micro-batch, 5 per epoch
    whatever the accumulation: after epoch e, 0.1 / (1 + 0.1 * 5 * (e + 1)), times the multiplier."""
    return 0.1 / (1 + 0.5 * (epoch + 1)) * MULTIPLIERS[epoch]


def expected_rows():
    """Per epoch, worked from the formulas: S2's accumulation 2 from epoch 4 on takes ceil(5 / 2) = 3
    optimizer steps; the LR after each epoch is lr_after."""
    steps = [5, 5, 5, 5, 3, 3]
    accumulation = [1, 1, 1, 1, 2, 2]
    return [[s, k, lr_after(e)] for e, (s, k) in enumerate(zip(steps, accumulation, strict=True))]


def test_lightning_follows_the_lr_and_the_accumulation(tmp_path):
    pytest.importorskip("lightning")
    (rank0,) = lightning_run(tmp_path, 1)
    assert rank0["phases"] == {"S1": 2, "S2": 3}
    for row, expected in zip(rank0["rows"], expected_rows(), strict=True):
        assert row[:2] == expected[:2] and row[2] == pytest.approx(expected[2], rel=1e-12)


def test_lightning_ddp_ranks_agree(tmp_path):
    pytest.importorskip("lightning")
    rank0, rank1 = lightning_run(tmp_path, 2)
    assert rank0 == rank1  # the same phases, LRs, steps and accumulation, and the same averaged losses
    assert rank0["phases"] == {"S1": 2, "S2": 3}


# ----- the Hugging Face Trainer, with the docs' PhaseTrainerCallback -----


def test_hf_trainer_follows_the_lr(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    if not transformers.utils.is_torch_available():  # transformers 5 needs torch 2.6 or newer
        pytest.skip(f"transformers {transformers.__version__} does not run on torch {torch.__version__}")
    from transformers import Trainer, TrainingArguments

    namespace = run_documented_code("docs/library.md", "**The Hugging Face Trainer.**")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 2)

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    generator = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(40, 4, generator=generator), torch.randint(0, 2, (40,), generator=generator)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    base = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + 0.1 * step))
    controller = pc.PhaseController(s1_threshold=1.0, s2_threshold=10.0, s3_patience=100)
    scheduler = pc.PhaseScheduler(optimizer, controller, base=base)
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=6, per_device_train_batch_size=8, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=[{"x": x, "labels": y} for x, y in zip(xs, ys, strict=True)],
        optimizers=(optimizer, scheduler), callbacks=[namespace["PhaseTrainerCallback"](scheduler)],
    )  # fmt: skip
    trainer.train()
    assert controller.transition_epochs == {"S1": 2, "S2": 3} and trainer.state.global_step == 30
    # The Trainer keeps accumulation 1, and steps the base per optimizer step: 5 per epoch, as above.
    logged = [row for row in trainer.state.log_history if "phase" in row]
    assert [row["lr_mult"] for row in logged] == MULTIPLIERS
    for epoch, row in enumerate(logged):
        assert row["lr_group_0"] == pytest.approx(lr_after(epoch), rel=1e-12)
