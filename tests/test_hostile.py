"""Hostile inputs and faults, one class at a time: nothing written outside the output and data
folders, no silent wrong result, no message that loses work, bounded work, one line and exit 2."""

import json
import os
import pickle
import subprocess
import sys
import threading

import pytest
from helpers import (
    ALL_PHASES,
    DELETE,
    ROOT,
    RUN,
    TINY,
    cli,
    edit,
    files_left,
    one_line_error,
    run_main,
    write_cifar_folder,
)

import phase_controller as pc
from phase_cifar10 import data, evidence, files, training

# ----- links: nothing is written through a link planted in the output folder -----


@pytest.mark.parametrize(
    "planted, refusal",
    [
        (".lock_seed_42", "is a symbolic link: refusing to"),
        ("figure_seed_42.png", "is a symbolic link: refusing to"),
        ("results_seed_42.json", "of an earlier run"),  # a fresh start never replaces a results file
        ("checkpoint_seed_42_baseline.jsonl", "of an earlier run"),
    ],
)
def test_a_link_where_a_run_writes_is_refused_and_its_target_untouched(tmp_path, planted, refusal):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / planted).symlink_to(victim)
    code, _, stderr = run_main([*RUN, "--output-dir", out])
    one_line_error(code, stderr, planted, refusal)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("planted", ["results_seed_42.json", "checkpoint_seed_42_baseline.jsonl"])
def test_restart_removes_a_planted_link_never_its_target(tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / planted).symlink_to(victim)
    assert run_main([*RUN, "--output-dir", out, "--restart"])[0] == 0
    assert victim.read_text() == "precious" and not (out / planted).is_symlink()


def test_summarize_refuses_a_link_at_the_summary_and_predictable_temp_names_are_gone(tmp_path, default_run):
    out, _, _ = default_run
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "results_seed_42.json").write_bytes((out / "results_seed_42.json").read_bytes())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # The names a writer once used (.NAME.tmp-PID) for every pid near ours: none is ever opened.
    for pid in range(os.getpid() - 5, os.getpid() + 5):
        (folder / f".multi_seed_summary.json.tmp-{pid}").symlink_to(victim)
    code, _, stderr = run_main(["--summarize", folder])
    assert code == 0, stderr
    assert victim.read_text() == "precious" and not (folder / "multi_seed_summary.json").is_symlink()
    (folder / "multi_seed_summary.png").unlink()
    (folder / "multi_seed_summary.png").symlink_to(victim)
    code, _, stderr = run_main(["--summarize", folder])
    one_line_error(code, stderr, "multi_seed_summary.png is a symbolic link")
    assert victim.read_text() == "precious"


def test_written_files_get_the_mode_open_would_give(tmp_path):
    files.write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~files.current_umask()


# ----- empty and impossible paths are refused, never taken as "." or as absent -----


@pytest.mark.parametrize("flag", ["--output-dir", "--data-dir", "--summarize", "--replay"])
@pytest.mark.parametrize("value", ["", "   ", "a\0b"], ids=["empty", "blank", "nul"])
def test_a_path_flag_needs_a_path(tmp_path, monkeypatch, flag, value):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_main([*RUN, flag, value])
    one_line_error(code, stderr, f"{flag} must be a path, got {value!r}")
    assert stdout == "" and list(tmp_path.iterdir()) == []


# ----- flags out of range: one line before anything exists -----

OUT_OF_RANGE = [
    (["--seed", "-1"], "--seed must be an integer in 0..4,294,967,295, got -1"),
    (["--seed", str(2**32)], "--seed must be an integer in 0..4,294,967,295, got 4294967296"),
    (["--seeds", "1,-2"], "--seeds must be comma-separated distinct integers in 0..2**32-1"),
    (["--epochs", str(10**30)], "--epochs must be an integer in 1..1,000,000"),
    (["--base-lr", "1e308"], "--base-lr 1e+308 is too large"),
    (["--lr-pulse", "1e300", "--base-lr", "1e10"], "--base-lr 10000000000.0 is too large"),
    (["--grad-accum", "1" + "0" * 400, "--s1-threshold", "1" + "0" * 400], "--s1-threshold must be finite"),
    (["--width", "100000"], "--width 100000: the model's"),
    (["--output-dir", "x" * 300], "cannot be used (File name too long)"),
]


@pytest.mark.parametrize("argv, message", OUT_OF_RANGE, ids=[" ".join(a)[:40] for a, _ in OUT_OF_RANGE])
def test_a_flag_out_of_range_is_one_line_and_creates_nothing(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path / "out", *argv])
    one_line_error(code, stderr, message)
    assert list(tmp_path.iterdir()) == []


# ----- records: a results file or checkpoint of the wrong shape is refused, naming it -----


RESULTS_EDITS = [
    (("config", "epochs"), 4, "baseline logs 6 epochs, not all of them"),
    (("config", "seed"), "42", "config's seed must be an integer in 0..4,294,967,295, got '42'"),
    (("config", "lr_pulse"), -1, "config's lr_pulse must be > 0, got -1"),
    (("config", "width"), True, "config's width must be an integer >= 1, got True"),
    (("config", "epochs"), 2_000_000, "config's epochs must be an integer in 1..1,000,000"),
    (("config", "precision"), "fp8", "config's precision must be one of fp32, bf16-autocast, got 'fp8'"),
    (("config", "control"), DELETE, "config lacks 'control'"),
    (("phase_aware", "per_epoch", "phase", 5), "S9", "phase holds a name not in"),
    (("phase_aware", "per_epoch", "phase", 5), "S0_EXPLORE", "goes back to an earlier phase"),
    (("phase_aware", "per_epoch", "train_loss", 0), 10**400, "train_loss holds a value not a finite number"),
    (("phase_aware", "per_epoch", "eval_acc"), {"0": 1}, "per_epoch holds a non-list"),
    (("baseline", "per_epoch", "lr"), [0.1], "per_epoch lists differ in length"),
    (("baseline", "status"), "great", "baseline status 'great'"),
    (("baseline", "final_acc"), None, "baseline final_acc None"),
    (("phase_aware", "transition_epochs"), {"S1": 99}, "transition_epochs"),
    (("baseline",), DELETE, "no baseline arm"),
]


@pytest.mark.parametrize("path, value, message", RESULTS_EDITS, ids=[str(e[2])[:30] for e in RESULTS_EDITS])
def test_an_edited_results_file_is_refused_by_summarize_replay_and_resume(tmp_path, default_run, path, value, message):
    out, results, _ = default_run
    results = json.loads(json.dumps(results))
    edit(results, path, value)
    (tmp_path / "results_seed_42.json").write_text(json.dumps(results))
    for argv in (
        ["--summarize", tmp_path],
        ["--replay", tmp_path / "results_seed_42.json", "--output-dir", tmp_path / "replay"],
        [*TINY, *ALL_PHASES, "--output-dir", tmp_path, "--resume"],
    ):
        code, _, stderr = run_main(argv)
        one_line_error(code, stderr, "results_seed_42.json", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_seed_42.json"]


def test_a_deeply_nested_or_huge_results_file_is_one_line(tmp_path):
    (tmp_path / "results_seed_1.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, stderr = run_main(["--summarize", tmp_path])
    one_line_error(code, stderr, "results_seed_1.json: not a results file", "nested too deeply")


# ----- messages never lead to data loss -----


INTERRUPT_WHILE_IMPORTING = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
if sys.argv[1] == "command":  # the installed phase-controller command
    from phase_cifar10 import main
    sys.exit(main(["--help"]))
sys.argv = ["phase_controller.py", "--help"]  # the script: the library, then the experiment
import runpy
runpy.run_path("phase_controller.py", run_name="__main__")
"""


def test_an_interrupt_while_torch_loads_is_one_line_and_exit_130_for_the_installed_command():
    command = [sys.executable, "-c", INTERRUPT_WHILE_IMPORTING, "command"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "interrupted while starting; nothing was written"


def test_an_interrupt_while_the_script_loads_torch_stops_it_as_python_does():
    # The library reads first; its __main__ block comes last, so Python's own KeyboardInterrupt ends it.
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPT_WHILE_IMPORTING, "script"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0 and result.stderr.rstrip().endswith("KeyboardInterrupt") and result.stdout == ""


def test_interrupted_summarize_advises_no_resume(tmp_path, default_run, monkeypatch):
    out, _, _ = default_run

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evidence, "plot_summary", interrupted)
    code, _, stderr = run_main(["--summarize", out])
    assert code == 130 and "rerun the same command" in stderr and "--resume" not in stderr


# ----- bounded work: special files refused at once, batch files bounded in memory -----


def refused_at_once(argv):
    """run_main in a thread that must end within a minute (a FIFO would block it forever)."""
    done = {}
    thread = threading.Thread(target=lambda: done.update(result=run_main(argv)), daemon=True)
    thread.start()
    thread.join(60)
    assert "result" in done, "blocked"
    return done["result"]


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_replay_of_a_special_file_is_refused_at_once(tmp_path, kind):
    path = {"fifo": tmp_path / "log.json", "folder": tmp_path / "dir.json", "device": "/dev/zero"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    code, _, stderr = refused_at_once(["--replay", path, "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, f"--replay {path}: cannot read it (not a regular file")


def test_a_fifo_batch_file_is_refused_at_once(tmp_path):
    write_cifar_folder(tmp_path / "data", per_batch=20)
    batch = tmp_path / "data" / data.CIFAR_FOLDER / "data_batch_3"
    batch.unlink()
    os.mkfifo(batch)
    code, _, stderr = refused_at_once(["--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, "data_batch_3: not a readable CIFAR-10 pickle", "not a regular file")


def test_labels_that_expand_without_bound_are_refused_unexpanded(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    folder = tmp_path / data.CIFAR_FOLDER
    images = data.read_cifar_pickle(folder / "data_batch_1")["data"]
    labels = list(range(10))
    for _ in range(8):  # lists of one shared list: 2.56e11 labels once expanded
        labels = [labels] * 20
    payload = pickle.dumps({"data": images, "labels": labels}, protocol=4)
    assert len(payload) < 100_000
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(files.UserError, match=r"'labels' should be 20 integers, found a list of 20 \(list\)"):
        data.read_cifar10(folder)


def test_a_batch_file_larger_than_its_images_can_need_is_refused_unread(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20)
    folder = tmp_path / data.CIFAR_FOLDER
    with open(folder / "data_batch_2", "ab") as f:
        f.truncate(20 * data.BATCH_BYTES_PER_IMAGE + data.PICKLE_OVERHEAD_BYTES + 1)
    with pytest.raises(files.UserError, match=r"data_batch_2: 1,130,497 bytes, more than the 1,130,496"):
        data.read_cifar10(folder)


# ----- data folders -----


def test_a_file_where_the_dataset_folder_goes_is_one_line(tmp_path):
    (tmp_path / data.CIFAR_FOLDER).write_text("not a folder")
    code, _, stderr = run_main(["--data-dir", tmp_path, "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, f"{tmp_path / data.CIFAR_FOLDER} is not a folder")


def test_an_unpack_a_kill_left_behind_is_removed_by_the_next_run(tmp_path, monkeypatch):
    leftover = tmp_path / ".cifar10-unpacking-k1ll3d"
    (leftover / data.CIFAR_FOLDER).mkdir(parents=True)
    (leftover / data.CIFAR_FOLDER / "data_batch_1").write_bytes(b"half")

    def offline(dest):
        raise OSError("no network")

    monkeypatch.setattr(data, "download_cifar10_archive", offline)
    code, _, stderr = run_main(["--data-dir", tmp_path, "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, "could not be downloaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----- replay of hostile logs -----


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("deep.json", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
        ("huge.json", f"[1.0, {10**400}]", "item 1 of the list is 1000"),
        ("wide.csv", "train_loss\n" + "1" * 200_000 + "\n", "not CSV this program reads (field larger than field"),
        ("overflow.json", "[1e308, -1e308, 1e308, -1e308]", "epoch 2: dL of train_loss -1e+308 overflows"),
    ],
)
def test_a_hostile_replay_log_is_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    code, _, stderr = run_main(["--replay", tmp_path / name, "--output-dir", tmp_path / "out"])
    one_line_error(code, stderr, f"--replay {tmp_path / name}", message)
    assert not (tmp_path / "out").exists()


# ----- faults while running: one line, nothing lost; real bugs keep their traceback -----


@pytest.mark.parametrize(
    "error, one_line",
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: 9 GB"), True),
        (MemoryError(), True),
        (RuntimeError("an internal bug"), False),
        (KeyError("an internal bug"), False),
    ],
)
def test_running_out_of_memory_is_one_line_a_bug_keeps_its_traceback(tmp_path, monkeypatch, error, one_line):
    calls, train_epoch = [], training.train_epoch

    def fails_in_the_second_epoch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return train_epoch(*args)

    monkeypatch.setattr(training, "train_epoch", fails_in_the_second_epoch)
    if not one_line:
        with pytest.raises(type(error)):
            run_main([*RUN, "--output-dir", tmp_path])
        return
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path])
    assert code == 2 and stderr.startswith("phase_controller.py: error: out of memory")
    assert "every completed epoch is checkpointed" in stderr and "--resume" in stderr


def test_out_of_memory_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    def fails(*args):
        raise MemoryError

    monkeypatch.setattr(training, "train_epoch", fails)
    code, _, stderr = run_main([*RUN, "--output-dir", tmp_path])
    one_line_error(code, stderr, "out of memory", "no epoch was completed, so there is nothing to resume")
    assert "--resume" not in stderr


def test_under_torchrun_a_bad_checkpoint_on_one_rank_stops_every_rank_before_training(tmp_path):
    (tmp_path / "checkpoint_seed_2_baseline.pt").write_bytes(b"garbage")  # seed 2 is rank 1's
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "phase_controller.py"), *RUN, "--seeds", "1,2", "--resume", "--output-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and " epoch " not in result.stdout
    ours = [line for line in result.stderr.splitlines() if line.startswith("phase_controller.py: error: ")]
    assert len(ours) == 1 and "checkpoint_seed_2_baseline.pt" in ours[0] and "found on rank 1" in ours[0]
    assert str(ROOT / "phase_cifar10") not in result.stderr  # no traceback of ours (torchrun adds its own report)
    assert files_left(tmp_path) == ["checkpoint_seed_2_baseline.pt"]


# ----- the library -----


def test_a_slope_that_overflows_is_refused_and_leaves_the_controller_as_it_was():
    controller = pc.PhaseController()
    controller.observe(1e308)
    before = controller.state_dict()
    with pytest.raises(ValueError, match="overflows"):
        controller.observe(-1e308)
    assert controller.state_dict() == before


def test_settings_take_integers_of_any_size_and_refuse_floats_beyond_range():
    assert pc.PhaseController(grad_accum=10**30).grad_accum == 10**30
    with pytest.raises(ValueError, match="s1_threshold must be finite"):
        pc.PhaseController(s1_threshold=10**400)


def test_cli_subprocess_has_no_traceback_for_an_out_of_range_seed(tmp_path):
    result = cli(*RUN, "--seed", "-1", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
