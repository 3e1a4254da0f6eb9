"""What a launch may meet: stray torchrun variables, a reader that goes away, odd names and backends,
and a rerun, a resume or a summary over other data, threads, seeds or runs. Each is refused in one
line or survived, never a silent wrong result and never lost work."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    ROOT,
    RUN,
    TINY,
    files_left,
    free_port,
    interrupt_after,
    one_line_error,
    read_json,
    run_main,
    without_timings,
    write_cifar_folder,
)

from phase_cifar10 import files, launch, ranks, training

# ----- the environment -----


@pytest.mark.parametrize(
    "env, rule",
    [
        ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK must lie in 0..WORLD_SIZE-1"),  # once it trained nothing
        ({"RANK": "1"}, "RANK must lie in 0..WORLD_SIZE-1"),
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "torchrun sets these to whole numbers"),
        ({"LOCAL_RANK": "3"}, "LOCAL_RANK must lie below LOCAL_WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "RANK must lie in 0..WORLD_SIZE-1"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "several ranks need MASTER_ADDR and a MASTER_PORT"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "http"}, "MASTER_PORT"),
    ],
)
def test_torchrun_variables_that_describe_no_launch_are_refused_at_once(tmp_path, monkeypatch, env, rule):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, stdout, stderr = run_main([*RUN, "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, rule, "unset them to run alone")
    assert stdout == "" and not (tmp_path / "out").exists()


def test_a_rank_whose_peers_never_come_gives_up_in_one_line(tmp_path, monkeypatch):
    # Once it waited 7 days, deaf to Ctrl-C. Here the limit is cut to a second to keep the test short.
    monkeypatch.setattr(ranks, "RENDEZVOUS_SECONDS", 1)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, "the 2 ranks did not meet at 127.0.0.1:", "within 1 s", "1 of 2 ranks came")
    assert not (tmp_path / "out").exists()


def test_a_rank_0_that_hosts_the_store_leaves_an_exchange_only_after_every_rank_has_read_it():
    # Its process takes the store with it when it ends, so returning early would strand rank 1.
    port = free_port()
    stores = [torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False),
              torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=False)]  # fmt: skip
    read = []

    class SlowReader:  # rank 1's store, which reads slowly
        def __getattr__(self, name):
            return getattr(stores[1], name)

        def get(self, key):
            time.sleep(0.2)
            read.append(time.monotonic())
            return stores[1].get(key)

    rank_1 = SimpleNamespace(rank=1, world=2, meeting=ranks.Meeting(SlowReader(), "test", hosted=False))
    rank_0 = SimpleNamespace(rank=0, world=2, meeting=ranks.Meeting(stores[0], "test", hosted=True))
    seen = {}
    thread = threading.Thread(target=lambda: seen.update({1: ranks.exchange(rank_1, {"b": [1]})}))
    thread.start()
    seen[0] = ranks.exchange(rank_0, "a")
    returned = time.monotonic()
    thread.join()
    assert seen == {0: ["a", {"b": [1]}], 1: ["a", {"b": [1]}]} and len(read) == 2 and returned > read[-1]


# ----- a reader that goes away, odd names and backends -----


def start(args, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / "phase_controller.py"), *map(str, args)], cwd=ROOT, **popen)


def test_a_reader_that_goes_away_stops_nothing(tmp_path):
    # As `python phase_controller.py ... | head -1`: the pipe closes after the first line.
    process = start([*RUN, "--output-dir", tmp_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert files_left(tmp_path) == ["figure_seed_42.png", "results_seed_42.json"]


def test_a_closed_stdout_stops_nothing(tmp_path):
    # As `python phase_controller.py ... >&-`: no stdout at all.
    process = start([*RUN, "--output-dir", tmp_path], stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    stderr = process.stderr.read().decode()
    assert process.wait() == 0 and stderr == ""
    assert files_left(tmp_path) == ["figure_seed_42.png", "results_seed_42.json"]


def test_a_replay_file_name_that_is_not_utf8_and_a_nonexistent_backend_are_no_trouble(tmp_path):
    log = Path(os.fsdecode(bytes(tmp_path) + b"/losses\xff.json"))
    log.write_text("[2.0, 1.9, 1.7, 1.5, 1.4]")
    env = {**os.environ, "MPLBACKEND": "nonexistent"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "phase_controller.py"), "--replay", log, "--output-dir", tmp_path / "out"],
        capture_output=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert b"losses\\udcff.json" in result.stdout  # the name, its byte that is not UTF-8 escaped
    assert sorted(os.listdir(os.fsencode(tmp_path / "out"))) == [b"replay_losses\xff.json", b"replay_losses\xff.png"]


# ----- a run's identity: data, threads, seed -----


def interrupted(folder, monkeypatch, argv, epochs=2):
    """A run of argv stopped after `epochs` logged epochs: its checkpoints in folder."""
    interrupt_after(monkeypatch, epochs)
    assert run_main([*argv, "--output-dir", folder])[0] == 130
    monkeypatch.undo()


def test_resume_on_other_data_is_refused(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path / "a", per_batch=20, seed=0)
    write_cifar_folder(tmp_path / "b", per_batch=20, seed=1)  # the same shapes, other images
    argv = ["--width", "4", "--batch-size", "50", "--epochs", "3", "--device", "cpu", "--bf16", "off"]
    interrupted(tmp_path / "out", monkeypatch, [*argv, "--data-dir", tmp_path / "a"])
    code, stdout, stderr = run_main([*argv, "--data-dir", tmp_path / "b", "--output-dir", tmp_path / "out", "--resume"])
    one_line_error(code, stderr, "was made with other settings (data_fingerprint '", "--restart")
    assert " epoch " not in stdout


def test_summarize_refuses_seeds_trained_on_other_data(tmp_path):
    write_cifar_folder(tmp_path / "a", per_batch=20, seed=0)
    write_cifar_folder(tmp_path / "b", per_batch=20, seed=1)
    argv = ["--width", "4", "--batch-size", "50", "--epochs", "1", "--device", "cpu", "--bf16", "off"]
    for seed, data in ((1, "a"), (2, "b")):
        code, _, stderr = run_main(
            [*argv, "--seed", seed, "--data-dir", tmp_path / data, "--output-dir", tmp_path / "out"]
        )
        assert code == 0, stderr
    fingerprints = [
        read_json(tmp_path / "out" / f"results_seed_{s}.json")["config"]["data_fingerprint"] for s in (1, 2)
    ]
    assert len(set(fingerprints)) == 2 and all(len(f) == 16 for f in fingerprints)
    code, _, stderr = run_main(["--summarize", tmp_path / "out"])
    one_line_error(code, stderr, "were run with different settings or data: data_fingerprint")


def test_summarize_checks_data_and_threads_among_the_files_that_record_them(tmp_path):
    # A results file from before the fingerprint and thread count were recorded, beside newer ones:
    # it joins their summary, named as not checked, while the newer ones are still compared.
    write_cifar_folder(tmp_path / "a", per_batch=20, seed=0)
    write_cifar_folder(tmp_path / "b", per_batch=20, seed=1)
    argv = ["--width", "4", "--batch-size", "50", "--epochs", "1", "--device", "cpu", "--bf16", "off"]
    for seed, data in ((1, "a"), (2, "a"), (3, "b")):
        code, _, stderr = run_main(
            [*argv, "--seed", seed, "--data-dir", tmp_path / data, "--output-dir", tmp_path / "out"]
        )
        assert code == 0, stderr
    older = tmp_path / "out" / "results_seed_1.json"  # sorted first: the one the others met first
    results = read_json(older)
    del results["config"]["data_fingerprint"], results["config"]["threads"]
    older.write_text(json.dumps(results))
    code, _, stderr = run_main(["--summarize", tmp_path / "out"])
    one_line_error(code, stderr, "data_fingerprint '", "in results_seed_2.json", "in results_seed_3.json")
    (tmp_path / "out" / "results_seed_3.json").unlink()
    code, stdout, stderr = run_main(["--summarize", tmp_path / "out"])
    assert code == 0, stderr
    assert "not checked: results_seed_1.json predate the record of data_fingerprint and threads" in stdout
    config = read_json(tmp_path / "out" / "multi_seed_summary.json")["config"]
    assert config["width"] == 4 and "data_fingerprint" not in config and "threads" not in config


def test_resume_under_another_thread_count_is_refused(tmp_path, monkeypatch):
    interrupted(tmp_path, monkeypatch, RUN)
    threads = torch.get_num_threads()
    monkeypatch.setattr(launch.torch, "get_num_threads", lambda: threads + 1)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path, "--resume"])
    one_line_error(code, stderr, f"threads {threads} there, {threads + 1} now")


def with_config(path, edit_config):
    """Rewrite a checkpoint as if another process had made it: edit_config(its config)."""
    state = torch.load(path, weights_only=True)
    edit_config(state["config"])
    torch.save(state, path)


# What another machine would have written: a CPU's model as /proc/cpuinfo names it, a torch release.
@pytest.mark.parametrize(
    "key, there", [("machine", "Intel(R) Xeon(R) Platinum 8480+ (cpu family 6, model 143)"), ("torch_version", "2.4.1")]
)
def test_resume_of_a_checkpoint_another_machine_or_torch_computed_is_refused(tmp_path, monkeypatch, key, there):
    interrupted(tmp_path, monkeypatch, RUN, epochs=5)  # the baseline done, the phase arm one epoch saved
    now = torch.load(tmp_path / "checkpoint_seed_42_baseline.pt", weights_only=True)["config"][key]
    if key == "torch_version":
        assert now == str(torch.__version__)
    with_config(tmp_path / "checkpoint_seed_42_phase_aware.pt", lambda config: config.update({key: there}))
    code, stdout, stderr = run_main([*RUN, "--output-dir", tmp_path, "--resume"])
    one_line_error(code, stderr, f"checkpoint_seed_42_phase_aware.pt was computed elsewhere ({key} {there!r} there, "
                   f"{now!r} now)", "--restart")  # fmt: skip
    assert " epoch " not in stdout


def test_a_checkpoint_from_before_the_machine_was_recorded_resumes(tmp_path, monkeypatch):
    interrupted(tmp_path / "cut", monkeypatch, RUN)
    for path in (tmp_path / "cut").glob("checkpoint_seed_42_*.pt"):
        with_config(path, lambda config: config.pop("machine"))
    assert run_main([*RUN, "--output-dir", tmp_path / "cut", "--resume"])[0] == 0
    assert run_main([*RUN, "--output-dir", tmp_path / "whole"])[0] == 0
    assert without_timings(read_json(tmp_path / "cut" / "results_seed_42.json")) == without_timings(
        read_json(tmp_path / "whole" / "results_seed_42.json")
    )


def test_resume_into_a_folder_without_the_run_says_so(tmp_path):
    code, stdout, stderr = run_main([*RUN, "--epochs", "1", "--output-dir", tmp_path / "misspelt", "--resume"])
    assert code == 0, stderr
    assert f"note: --resume found nothing of seeds [42] in {tmp_path / 'misspelt'}: they start afresh" in stdout


def test_resume_and_restart_together_are_refused(tmp_path):
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path, "--resume", "--restart"])
    one_line_error(code, stderr, "--resume continues the seeds, --restart replaces them")


# ----- faults inside a save -----


def test_an_interrupt_inside_a_checkpoint_serialization_waits_for_its_end():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with files.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("serialized")  # torch.save would run here, whole
    assert done == ["serialized"]


def test_an_interrupt_another_thread_receives_waits_too():
    # A Ctrl-C goes to the process, and the kernel may hand it to any thread that does not block it,
    # such as torch's worker threads; Python then raises it in the main thread all the same.
    other, stop = threading.Thread(target=lambda: stop.wait()), threading.Event()
    other.start()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with files.signals_deferred():
                signal.pthread_kill(other.ident, signal.SIGINT)
                for _ in range(200):  # time for the signal to arrive and for Python to act on it
                    time.sleep(0.001)
                done.append("serialized")
    finally:
        stop.set()
        other.join()
    assert done == ["serialized"]


def test_the_locks_cleanup_never_replaces_the_real_error(tmp_path, monkeypatch):
    # A write that fails, then a lock file that cannot be removed (a folder made read-only mid-run).
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    unlink = Path.unlink

    def refuse_the_lock(path, missing_ok=False):
        if path.name.startswith(".lock_seed_"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(files.os, "replace", full)
    monkeypatch.setattr(Path, "unlink", refuse_the_lock)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path])
    one_line_error(code, stderr, "No space left on device", "--resume")
    assert ".lock_seed_42" not in stderr


def test_a_checkpoint_costs_the_same_at_every_epoch(tmp_path, monkeypatch):
    sizes, write = [], files.write_atomically

    def measured(path, data):
        if Path(path).name == "checkpoint_seed_42_baseline.pt":
            sizes.append(len(data))
        write(path, data)

    monkeypatch.setattr(training, "write_atomically", measured)
    assert run_main([*TINY, "--epochs", "8", "--output-dir", tmp_path])[0] == 0
    # The epoch log grows beside it, a row per epoch; the checkpoint holds what does not grow.
    assert len(sizes) == 8 and max(sizes) - min(sizes) <= 64, sizes
