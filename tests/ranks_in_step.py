"""Run under torchrun with 2 processes (gloo, CPU): each rank feeds PhaseSchedulers its own losses,
once averaged over the ranks (the default) and once not (sync_ranks=False), and writes what each
decided to OUT/rank_R.json."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import phase_controller as pc

# The ranks' own mean training losses per epoch, as two shards of one dataset might give them.
LOSSES = [[2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3], [2.0, 2.0, 1.99, 1.98, 1.9, 1.8, 1.7, 1.6]]
EVAL_LOSSES = [[1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [1.1, 1.0, 1.0, 0.95, 0.95, 0.95, 0.95, 0.95]]
SETTINGS = dict(s1_threshold=-0.05, s2_threshold=0.06, s3_patience=2)


def decisions(sync_ranks, rank):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    base = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch)
    scheduler = pc.PhaseScheduler(optimizer, pc.PhaseController(**SETTINGS), base=base, sync_ranks=sync_ranks)
    seen = {"phase": [], "lr_mult": [], "accumulation": [], "lr": []}
    for train_loss, eval_loss in zip(LOSSES[rank], EVAL_LOSSES[rank], strict=True):
        scheduler.observe(train_loss, eval_loss)
        optimizer.step()  # no gradients, so nothing moves; a loop steps its optimizer before its scheduler
        scheduler.step()
        seen["phase"].append(scheduler.controller.phase)
        seen["lr_mult"].append(scheduler.lr_mult)
        seen["accumulation"].append(scheduler.accumulation)
        seen["lr"].append(scheduler.get_last_lr()[0])
    return seen | {"transition_epochs": scheduler.controller.transition_epochs}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"synced": decisions(True, rank), "unsynced": decisions(False, rank)}
    Path(sys.argv[1], f"rank_{rank}.json").write_text(json.dumps(result))
    # Leave without destroying the group or the interpreter's teardown, whose destructors can fail
    # a finished run: with torch 2.14.1 on a 2-core machine, about one run in six aborted in the
    # teardown ("terminate called without an active exception", SIGABRT); with torch 2.4.1,
    # destroy_process_group() right after the last all_reduce sometimes never returned.
    sys.stdout.flush()
    os._exit(0)
