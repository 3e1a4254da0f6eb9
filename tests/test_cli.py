"""Command line: argument errors stop before anything is written, data errors are one line."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY, cli, read_json, run_main, write_cifar_folder

from phase_cifar10 import command_line, data, devices, launch, settings

BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs must be an integer in 1..1,000,000, got 0"),
    (["--epochs", "abc"], "invalid int value"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be an integer >= 0, got -1"),
    (["--warmup-epochs", "30"], "< --epochs (30)"),
    (["--epochs", "3", "--warmup-epochs", "3"], "< --epochs (3)"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--width", "0"], "--width must be an integer >= 1, got 0"),
    (["--subset", "-1"], "--subset must be an integer >= 0, got -1"),
    (["--val-size", "-5"], "--val-size must be an integer >= 0, got -5"),
    (["--base-lr", "0"], "--base-lr must be a finite number > 0, got 0.0"),
    (["--base-lr", "-0.1"], "--base-lr must be a finite number > 0, got -0.1"),
    (["--base-lr", "nan"], "--base-lr must be a finite number > 0, got nan"),
    (["--multi-seed", "--seeds", "1,x"], "--seeds must be comma-separated distinct integers in 0..2**32-1, got '1,x'"),
    (["--multi-seed", "--seeds", "1,2,1"], "--seeds must be comma-separated distinct integers in 0..2**32-1"),
    (["--s2-threshold", "-0.001"], "--s2-threshold must be >= 0"),
    (["--lr-pulse", "0"], "--lr-pulse must be > 0"),
    (["--s1-threshold", "inf"], "--s1-threshold must be finite"),
    (["--grad-accum", "0"], "--grad-accum must be an integer >= 1"),
    (["--s3-patience", "0"], "--s3-patience must be an integer >= 1"),
    (["--dl-window", "0"], "--dl-window must be an integer >= 1"),
    (["--dl-mode", "weird"], "--dl-mode must be 'absolute' or 'relative', got 'weird'"),
    (["--device", "tpu"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lr", "0.1"], "unrecognized arguments: --lr 0.1"),  # not --lr-pulse: no abbreviations
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--seed", "1", "--seeds", "1,2"], "--seed runs one seed, --multi-seed/--seeds several"),
    (["--seed", "1", "--multi-seed"], "--seed runs one seed, --multi-seed/--seeds several"),
    (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs must be < --epochs (2), got 2"),
    (["--summarize", "x", "--replay", "y"], "not allowed with argument"),
    (["--replay-arm", "baseline"], "--replay-arm picks the curve --replay reads: pass --replay FILE with it"),
    (["--replay", "y", "--replay-arm", "best"], "argument --replay-arm: invalid choice: 'best'"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_stops_with_one_line_and_exit_2(tmp_path, argv, message):
    out = tmp_path / "out"
    code, stdout, stderr = run_main([*argv, "--output-dir", out])
    assert code == 2
    assert stderr.startswith("phase_controller.py: error: ") and message in stderr
    assert stderr.count("\n") == 1 and stdout == ""
    assert not out.exists()


def test_bad_argument_in_a_real_process_has_no_traceback(tmp_path):
    result = cli("--epochs", "0", "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr == "phase_controller.py: error: --epochs must be an integer in 1..1,000,000, got 0\n"
    assert not (tmp_path / "out").exists()


def test_zero_warmup_is_allowed():
    parsed = settings.Settings.from_command_line(["--warmup-epochs", "0", "--epochs", "1"])
    assert parsed.warmup_epochs == 0 and parsed.seeds_to_run() == [42]


def test_seeds_imply_multi_seed():
    parse = settings.Settings.from_command_line
    assert parse(["--seeds", "1,2"]).multi_seed and parse(["--seeds", "1,2"]).seeds_to_run() == [1, 2]
    assert parse(["--multi-seed"]).seeds_to_run() == [42, 137, 2024]
    assert parse(["--seed", "7"]).seeds_to_run() == [7] and not parse(["--seed", "7"]).multi_seed


@pytest.mark.parametrize("epochs, warmup", [(1, 0), (2, 1), (3, 2), (30, 2)])
def test_warmup_defaults_to_two_but_leaves_an_epoch_after_it(epochs, warmup):
    assert settings.Settings.from_command_line(["--epochs", str(epochs)]).warmup_epochs == warmup


def test_one_epoch_smoke_run(tmp_path):
    code, stdout, stderr = run_main([*TINY, "--epochs", "1", "--output-dir", tmp_path])
    assert code == 0, stderr
    results = read_json(tmp_path / "results_seed_42.json")
    assert results["config"]["warmup_epochs"] == 0 and len(results["baseline"]["per_epoch"]["lr"]) == 1
    assert results["baseline"]["per_epoch"]["lr"] == [0.01]  # no warmup: the cosine's start, the peak


def test_importing_leaves_the_environment_alone():
    code = "import os, phase_controller; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0 and result.stdout == "None\n", result.stderr


def test_cuda_asked_for_but_absent(tmp_path):
    code, _, stderr = run_main(["--device", "cuda", "--output-dir", tmp_path / "out"])
    assert code == 2 and "--device cuda asked for, but" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_more_ranks_than_gpus_stops_every_rank_before_the_ranks_meet(tmp_path, monkeypatch, rank):
    # torchrun --nproc_per_node 2 on a one-GPU node: rank 0 must not wait at the ranks' meeting for
    # a rank 1 that has already given up.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "TCPStore", lambda *a, **k: pytest.fail("the ranks' meeting was started"))
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": 29999}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    code, stdout, stderr = run_main([*TINY, "--device", "cuda", "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1 and stdout == ""
    assert "2 processes on this node need one CUDA device each, but 1 are visible" in stderr
    assert "--nproc_per_node 1" in stderr and "--resume" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_cuda_rank_makes_its_gpu_the_current_device(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert devices.pick_device("cuda", local_rank=1, local_world=2) == torch.device("cuda", 1) and current == [1]


SET_UP_BACKENDS = """
import os, torch
from phase_cifar10 import devices
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
devices.set_up_backends()
cudnn = torch.backends.cudnn
print(cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark,
      torch.are_deterministic_algorithms_enabled(), os.environ["CUBLAS_WORKSPACE_CONFIG"])
"""


def test_fp32_is_ieee_fp32_after_the_backends_are_set_up():
    # Current torch lets cuDNN convolutions use TF32 by default; no GPU is needed to read the flags.
    # In a process of its own: the flags and deterministic mode are process-wide.
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    result = subprocess.run([sys.executable, "-c", SET_UP_BACKENDS], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True", "False", "True", ":4096:8"]


def test_an_interrupt_before_training_does_not_advise_resume(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "plan_seed", interrupted)
    code, _, stderr = run_main([*TINY, "--output-dir", tmp_path / "out"])
    assert code == 130 and "nothing to resume" in stderr and "--resume" not in stderr


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, stderr = run_main([*TINY, "--output-dir", blocker / "out"])
    assert code == 2 and "cannot be created or written" in stderr and stderr.count("\n") == 1


def test_missing_dataset_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(dest):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "download_cifar10_archive", offline)
    data_dir = tmp_path / "data"
    code, _, stderr = run_main(["--data-dir", data_dir, "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1
    assert f"put the official cifar-10-python.tar.gz into {data_dir}/" in stderr
    assert not data_dir.exists() and not (tmp_path / "out").exists()  # a failed start leaves nothing behind


def test_invalid_dataset_stops_before_training(tmp_path):
    write_cifar_folder(tmp_path / "data", per_batch=20)
    (tmp_path / "data" / data.CIFAR_FOLDER / "data_batch_2").write_bytes(b"\x80\x02")
    code, stdout, stderr = run_main(["--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out"])
    assert code == 2 and "data_batch_2: not a readable CIFAR-10 pickle" in stderr
    assert " epoch " not in stdout


def test_cifar10_folder_end_to_end(tmp_path):
    write_cifar_folder(tmp_path / "data", per_batch=40)
    argv = [
        "--data-dir",
        tmp_path / "data",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--width",
        "8",
        "--batch-size",
        "50",
    ]
    code, stdout, stderr = run_main([*argv, "--output-dir", tmp_path / "out"])
    assert code == 0, stderr
    assert "holds 200 training images, not the 50,000 of CIFAR-10" in stdout
    results = read_json(tmp_path / "out" / "results_seed_42.json")
    assert results["config"]["dataset"] == "cifar10" and results["config"]["train_size"] == 200
    assert results["config"]["test_size"] == 40
    assert len(results["phase_aware"]["per_epoch"]["eval_acc"]) == 2


def test_subset_larger_than_the_data_creates_nothing(tmp_path):
    code, _, stderr = run_main([*TINY, "--subset", "5000", "--output-dir", tmp_path / "new" / "out"])
    assert code == 2 and "training images available" in stderr
    assert list(tmp_path.iterdir()) == []  # a start that fails its checks leaves nothing on disk


def test_the_flags_table_in_the_docs_is_the_parser():
    """Every flag, and only those, with the default its --help shows ("off" for a switch)."""
    table, section = {}, (ROOT / "docs" / "command-line.md").read_text().split("## Flags", 1)[1].split("\n## ")[0]
    for line in section.splitlines():
        if match := re.match(r"\| `(--[a-z0-9-]+)[^`]*` \|([^|]*)\|", line):
            table[match.group(1)] = match.group(2).replace("`", "").strip()
    parser = {}
    for action in settings.build_parser()._actions:
        if action.option_strings[0] != "-h":
            shown = re.search(r"\(default (.+)\)$", " ".join((action.help or "").split()))
            parser[action.option_strings[0]] = "off" if action.nargs == 0 else shown.group(1) if shown else ""
    assert table == parser


NEW_KEYWORD = """
import inspect, json, sys
import phase_controller as pc

original = pc.PhaseController.__init__


def __init__(self, *args, knob=7, **kwargs):  # a keyword the library might add one day
    if not knob >= 1:
        raise ValueError(f"knob must be >= 1, got {knob}")
    original(self, *args, **kwargs)


keyword = inspect.Parameter("knob", inspect.Parameter.KEYWORD_ONLY, default=7)
__init__.__signature__ = inspect.signature(original).replace(
    parameters=[*inspect.signature(original).parameters.values(), keyword]
)
pc.PhaseController.__init__ = __init__
from phase_cifar10 import files, settings

found = {"given": settings.Settings.from_command_line(["--knob", "9"]).controller["knob"]}
found["default"] = settings.Settings.from_command_line([]).controller["knob"]
try:
    settings.Settings.from_command_line(["--knob", "0"])
except files.UserError as e:
    found["refused"] = str(e)
old_file = {k: v for k, v in settings.Settings.from_command_line([]).recorded().items() if k != "knob"}
old_file |= {"seed": 42, "momentum": 0.9, "weight_decay": 5e-4, "precision": "fp32"}
settings.check_config(old_file)
found["old file"] = settings.identity(old_file)["knob"]
print(json.dumps(found))
"""


def test_a_new_controller_keyword_is_a_flag_and_a_setting_with_no_edit_but_its_help():
    result = subprocess.run([sys.executable, "-c", NEW_KEYWORD], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {"given": 9, "default": 7, "refused": "--knob must be >= 1, got 0", "old file": 7}


def test_the_training_module_knows_no_devices_ranks_or_locks():
    source = (ROOT / "phase_cifar10" / "training.py").read_text()
    imported = {
        name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
    }
    forbidden = {
        "torch.distributed",
        "launch",
        "devices",
        "ranks",
        "lock_file",
        "pick_device",
        "choose_precision",
        "os",
    }
    assert not imported & forbidden


def test_the_installed_command_names_itself_in_errors_and_in_its_advice(tmp_path, capsys):
    assert command_line.main(["--epochs", "0"], prog="phase-controller") == 2
    assert capsys.readouterr().err.startswith("phase-controller: error: --epochs must be")
    settings_ = settings.Settings.from_command_line(["--output-dir", str(tmp_path)])
    advice = command_line.what_to_do_next(settings_, ["--output-dir", str(tmp_path)], "phase-controller")
    assert advice.endswith("nothing to resume: rerun the same command")  # nothing was written yet
    (tmp_path / "checkpoint_seed_42_baseline.pt").write_bytes(b"")
    advice = command_line.what_to_do_next(settings_, ["--output-dir", str(tmp_path)], "phase-controller")
    assert advice.endswith(f"\n  phase-controller --output-dir {tmp_path} --resume")
    script = command_line.what_to_do_next(settings_, ["--output-dir", str(tmp_path)], "phase_controller.py")
    assert script.endswith(f"\n  python phase_controller.py --output-dir {tmp_path} --resume")
