"""A tiny Lightning run with the docs' PhaseCallback: python lightning_run.py OUT DEVICES. Each rank
writes OUT/rank_R.json: per epoch the optimizer steps, the accumulation and the LR after it."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import run_documented_code  # the script's own folder, tests/, is on sys.path

from phase_controller import PhaseController, PhaseScheduler

# The docs' PhaseCallback, executed as written.
PhaseCallback = run_documented_code("docs/library.md", "**PyTorch Lightning")["PhaseCallback"]

BATCHES = 5  # per epoch and process: 40 samples in batches of 8 (per rank under DDP: 80 / 2 ranks)
EPOCHS = 6


class Module(pl.LightningModule):
    def __init__(self, optimizer_lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=optimizer_lr)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.optimizer


class Record(pl.Callback):
    def __init__(self):
        self.rows, self.steps_before = [], 0

    def on_train_epoch_end(self, trainer, module):
        steps = trainer.global_step - self.steps_before
        self.steps_before = trainer.global_step
        self.rows.append([steps, trainer.accumulate_grad_batches, module.optimizer.param_groups[0]["lr"]])


def main(out, devices):
    module = Module()
    # Thresholds that force S1 after epoch 2 and S2 after epoch 3, whatever the losses.
    controller = PhaseController(s1_threshold=1.0, s2_threshold=10.0, s3_patience=100)
    base = torch.optim.lr_scheduler.LambdaLR(module.optimizer, lambda step: 1 / (1 + 0.1 * step))
    scheduler = PhaseScheduler(module.optimizer, controller, base=base)
    record = Record()
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40 * devices, 4, generator=generator),
                                          torch.randint(0, 2, (40 * devices,), generator=generator))  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        callbacks=[PhaseCallback(scheduler), record], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    result = {
        "rows": record.rows,
        "phases": controller.transition_epochs,
        "losses": controller.recent_losses,
        "seen": controller.epochs_seen,
    }
    Path(out, f"rank_{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
