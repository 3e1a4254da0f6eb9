"""Command line: argument errors stop before anything is written, data errors are one line."""

import re

import pytest
from helpers import ROOT, TINY, cli, read_json, run_main, write_cifar_folder

import phase_controller as pc

BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "abc"], "invalid int value"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    (["--warmup-epochs", "30"], "< --epochs (30)"),
    (["--epochs", "3", "--warmup-epochs", "3"], "< --epochs (3)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--width", "0"], "--width must be >= 1"),
    (["--subset", "-1"], "--subset must be >= 0"),
    (["--val-size", "-5"], "--val-size must be >= 0"),
    (["--base-lr", "0"], "--base-lr must be > 0"),
    (["--base-lr", "-0.1"], "--base-lr must be > 0"),
    (["--base-lr", "nan"], "--base-lr must be > 0"),
    (["--multi-seed", "--seeds", "1,x"], "--seeds must be comma-separated integers"),
    (["--multi-seed", "--seeds", "1,2,1"], "--seeds has duplicates"),
    (["--s2-threshold", "-0.001"], "--s2-threshold must be >= 0"),
    (["--lr-pulse", "0"], "--lr-pulse must be > 0"),
    (["--s1-threshold", "inf"], "--s1-threshold must be finite"),
    (["--grad-accum", "0"], "--grad-accum must be an integer >= 1"),
    (["--s3-patience", "0"], "--s3-patience must be an integer >= 1"),
    (["--dl-window", "0"], "--dl-window must be an integer >= 1"),
    (["--device", "tpu"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--summarize", "x", "--replay", "y"], "not allowed with argument"),
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
    assert result.stderr == "phase_controller.py: error: --epochs must be >= 1, got 0\n"
    assert not (tmp_path / "out").exists()


def test_zero_warmup_is_allowed():
    args = pc.build_parser().parse_args(["--warmup-epochs", "0", "--epochs", "1"])
    pc.check_args(args)
    assert args.seed_list == [42]


def test_cuda_asked_for_but_absent(tmp_path):
    code, _, stderr = run_main(["--device", "cuda", "--output-dir", tmp_path / "out"])
    assert code == 2 and "--device cuda asked for, but" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_more_ranks_than_gpus_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(pc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pc.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, stdout, stderr = run_main([*TINY, "--device", "cuda", "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1 and stdout == ""
    assert "local rank 1 needs cuda:1, but 1 CUDA device(s) are visible" in stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, stderr = run_main([*TINY, "--output-dir", blocker / "out"])
    assert code == 2 and "cannot be created or written" in stderr and stderr.count("\n") == 1


def test_missing_dataset_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(dest):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(pc, "download_cifar10_archive", offline)
    data_dir = tmp_path / "data"
    code, _, stderr = run_main(["--data-dir", data_dir, "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1
    assert f"put the official cifar-10-python.tar.gz into {data_dir}/" in stderr
    assert list(data_dir.iterdir()) == [] and list((tmp_path / "out").iterdir()) == []


def test_invalid_dataset_stops_before_training(tmp_path):
    write_cifar_folder(tmp_path / "data", per_batch=20)
    (tmp_path / "data" / pc.CIFAR_FOLDER / "data_batch_2").write_bytes(b"\x80\x02")
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


def test_subset_larger_than_the_data(tmp_path):
    code, _, stderr = run_main([*TINY, "--subset", "5000", "--output-dir", tmp_path])
    assert code == 2 and "training images available" in stderr


def test_readme_documents_every_flag():
    readme = (ROOT / "README.md").read_text()
    flags = {opt for action in pc.build_parser()._actions for opt in action.option_strings if opt.startswith("--")}
    flags.discard("--help")
    missing = sorted(flag for flag in flags if not re.search(re.escape(flag) + r"\b", readme))
    assert missing == []
