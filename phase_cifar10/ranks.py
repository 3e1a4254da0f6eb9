"""torchrun: a rank's environment, the meeting of the ranks, and every rank stopping on any rank's
bad input. Each process trains whole seeds (every world-th), so ranks exchange only small Python
objects: which inputs failed, and which arms diverged."""

import os
import time
from datetime import timedelta

import torch.distributed as dist

from .files import UserError, one_line

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
RENDEZVOUS_SECONDS = 300  # torch's own default waits 30 minutes, without a word and deaf to Ctrl-C


def distributed_env():
    """(rank, world_size, local_rank, local_world_size) under torchrun; (0, 1, 0, 1) without its
    variables. UserError for values that cannot describe a launch (a stray RANK or WORLD_SIZE)."""
    given = {name: os.environ[name] for name in TORCHRUN_VARIABLES if name in os.environ}
    shown = " ".join(f"{name}={value}" for name, value in given.items())
    try:
        values = {name: int(value) for name, value in given.items()}
    except ValueError:
        raise UserError(f"{shown}: torchrun sets these to whole numbers; unset them to run alone") from None
    rank, world, local_rank = values.get("RANK", 0), values.get("WORLD_SIZE", 1), values.get("LOCAL_RANK", 0)
    local_world = values.get("LOCAL_WORLD_SIZE", local_rank + 1)
    port = os.environ.get("MASTER_PORT", "")
    rules = [
        (world >= 1 and 0 <= rank < world, "RANK must lie in 0..WORLD_SIZE-1"),
        (0 <= local_rank < local_world <= world, "LOCAL_RANK must lie below LOCAL_WORLD_SIZE, within WORLD_SIZE"),
        (world == 1 or os.environ.get("MASTER_ADDR") and port.isdigit() and 0 < int(port) < 65536,
         "several ranks need MASTER_ADDR and a MASTER_PORT in 1..65535 to meet at"),
    ]  # fmt: skip
    for ok, rule in rules:
        if not ok:
            raise UserError(f"{shown}: {rule}; torchrun sets these for each rank it starts: unset them to run alone")
    return rank, world, local_rank, local_world


def join_ranks(rank, world):
    """Meet the other ranks at MASTER_ADDR:MASTER_PORT (torchrun's store when its agent hosts one),
    or give up after RENDEZVOUS_SECONDS in one line; waiting is a Python loop, so Ctrl-C works.
    Then the process group: only collectives of small Python objects are needed, and gloo serves
    them on any device."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    key, waited = f"phase_cifar10/joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", time.monotonic()
    try:
        store = dist.TCPStore(address, port, world, is_master=rank == 0 and not agent_store,
                              timeout=timedelta(seconds=RENDEZVOUS_SECONDS), wait_for_workers=False)  # fmt: skip
        store.add(key, 1)
        while store.add(key, 0) < world:
            if time.monotonic() - waited > RENDEZVOUS_SECONDS:
                raise TimeoutError(f"{store.add(key, 0)} of {world} ranks came")
            time.sleep(0.2)
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"the {world} ranks did not meet at {address}:{port} within {RENDEZVOUS_SECONDS} s ({one_line(e)}): start "
            f"them all (torchrun --nproc_per_node {world}), or unset {' '.join(TORCHRUN_VARIABLES)} to run alone"
        ) from None
    store.set_timeout(timedelta(days=7))  # seeds may run for days before the ranks meet again
    dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                            timeout=timedelta(days=7))  # fmt: skip


class StoppedOnRank0(UserError):
    """A bad input on some rank, which rank 0 reports for all; the other ranks stop without a word."""


def on_every_rank(launch, check):
    """check() on this rank; under torchrun every rank then learns whether any rank failed it, so
    that a bad input found on one rank stops them all, in one line, before any training."""
    try:
        result, error = check(), None
    except UserError as e:
        result, error = None, str(e)
    errors = [error]
    if launch.world > 1:
        errors = [None] * launch.world
        dist.all_gather_object(errors, error)
    failed = [(where, message) for where, message in enumerate(errors) if message is not None]
    if failed:
        where, message = failed[0]
        if launch.rank != 0:
            raise StoppedOnRank0(message)
        raise UserError(message if launch.world == 1 else f"{message} (found on rank {where}; every rank stopped)")
    return result
