"""torchrun: a rank's environment, the meeting of the ranks, and every rank stopping on any rank's
bad input. Each process trains whole seeds (every world-th), so the ranks exchange only small
values, in the store where they met: which inputs failed, and which arms diverged."""

import json
import os
import time
from datetime import timedelta
from typing import NamedTuple

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


class Meeting(NamedTuple):
    """Where the ranks met: the store, this attempt's prefix for keys in it (torchrun restarts reuse
    its agent's store), and whether this process hosts it (rank 0 when torchrun's agent does not)."""

    store: "dist.Store"  # named, not looked up: some torch builds have no distributed support
    prefix: str
    hosted: bool


def join_ranks(rank, world):
    """Meet the other ranks at MASTER_ADDR:MASTER_PORT (torchrun's store when its agent hosts one),
    or give up after RENDEZVOUS_SECONDS in one line; waiting is a Python loop, so Ctrl-C works.
    Each process trains whole seeds, so the ranks need no process group: they exchange their few
    small values in this store (exchange())."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosted = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    prefix = f"phase_cifar10/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    joined, deadline = f"{prefix}/joined", time.monotonic() + RENDEZVOUS_SECONDS
    try:
        store = dist.TCPStore(address, port, world, is_master=hosted, timeout=timedelta(seconds=RENDEZVOUS_SECONDS),
                              wait_for_workers=False)  # fmt: skip
        store.add(joined, 1)
        wait_until(lambda: store.add(joined, 0) == world, deadline,
                   lambda: f"{store.add(joined, 0)} of {world} ranks came")  # fmt: skip
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"the {world} ranks did not meet at {address}:{port} within {RENDEZVOUS_SECONDS} s ({one_line(e)}): start "
            f"them all (torchrun --nproc_per_node {world}), or unset {' '.join(TORCHRUN_VARIABLES)} to run alone"
        ) from None
    return Meeting(store, prefix, hosted)


def wait_until(done, deadline=None, what=None):
    """Poll done() until it holds, in a Python loop (Ctrl-C works); TimeoutError(what()) once the
    monotonic clock passes deadline."""
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(what())
        time.sleep(0.05)


def exchange(launch, value):
    """Every rank's value (anything JSON writes), in rank order; [value] without torchrun. Each rank
    calls it equally often, which numbers the exchanges. A hosting rank 0 returns only when every
    rank has read every value: its process takes the store with it when it ends."""
    if launch.world == 1:
        return [value]
    store, prefix = launch.meeting.store, launch.meeting.prefix
    slot = f"{prefix}/exchange/{store.add(f'{prefix}/exchanges/{launch.rank}', 1)}"
    store.set(f"{slot}/{launch.rank}", json.dumps(value))
    keys = [f"{slot}/{rank}" for rank in range(launch.world)]
    wait_until(lambda: store.check(keys))
    values = [json.loads(store.get(key)) for key in keys]
    store.add(f"{slot}/read", 1)
    if launch.meeting.hosted:
        wait_until(lambda: store.add(f"{slot}/read", 0) == launch.world)
    return values


class StoppedOnRank0(UserError):
    """A bad input on some rank, which rank 0 reports for all; the other ranks stop without a word."""


def on_every_rank(launch, check):
    """check() on this rank; under torchrun every rank then learns whether any rank failed it, so
    that a bad input found on one rank stops them all, in one line, before any training."""
    try:
        result, error = check(), None
    except UserError as e:
        result, error = None, str(e)
    failed = [(where, message) for where, message in enumerate(exchange(launch, error)) if message is not None]
    if failed:
        where, message = failed[0]
        if launch.rank != 0:
            raise StoppedOnRank0(message)
        raise UserError(message if launch.world == 1 else f"{message} (found on rank {where}; every rank stopped)")
    return result
