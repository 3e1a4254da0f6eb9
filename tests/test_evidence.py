"""Honest evidence: paired statistics, the LR-matched control, validation selection,
sharded seeds (summarize and torchrun) and replay."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ALL_PHASES, ROOT, TINY, read_json, run_main, without_timings

import phase_controller as pc

# ----- statistics, against hand-computed cases -----


@pytest.mark.parametrize(
    "deltas, p_value",
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # only all-plus and all-minus reach |mean| 2
        ([0.5, -0.25, 1.0], 4 / 8),  # |sums| over sign patterns: 1.75 1.25 0.75 0.25, twice each; >= 1.25: 4
        ([1.0, -1.0], 1.0),  # mean 0: every pattern is as extreme
        ([1.0, 2.0, 3.0, 4.0, 5.0], 2 / 32),  # the smallest p five seeds can give
        ([2.0], 1.0),
    ],
)
def test_sign_flip_p_value_is_exact(deltas, p_value):
    assert pc.sign_flip_p_value(deltas) == pytest.approx(p_value)


def test_sign_flip_beyond_sixteen_seeds_is_a_fixed_monte_carlo():
    deltas = np.linspace(0.1, 2.0, 20)
    p = pc.sign_flip_p_value(deltas)
    assert p == pc.sign_flip_p_value(deltas) and p == pytest.approx(1 / 100_001, rel=0.5)


@pytest.mark.parametrize(
    "values, interval",
    [
        ([0.5, 0.5, 0.5], [0.5, 0.5]),
        ([3.0], [3.0, 3.0]),
        ([0.0, 1.0], [0.0, 1.0]),  # resample means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4
    ],
)
def test_bootstrap_interval_in_hand_computable_cases(values, interval):
    assert pc.bootstrap_ci(values) == pytest.approx(interval)


def test_bootstrap_interval_is_fixed_and_inside_the_data_range():
    deltas = [0.3, -0.4, 1.2, 0.8, 0.1]
    low, high = pc.bootstrap_ci(deltas)
    assert pc.bootstrap_ci(deltas) == [low, high]
    assert min(deltas) <= low < np.mean(deltas) < high <= max(deltas)


def test_paired_stats_fields():
    s = pc.paired_stats([1.0, 2.0, 3.0])
    assert s["per_seed"] == [1.0, 2.0, 3.0] and s["mean"] == 2.0 and s["median"] == 2.0
    assert s["std"] == pytest.approx(1.0) and s["positive"] == 3 and s["total"] == 3
    assert s["p_value"] == pytest.approx(0.25) and s["ci95"][0] >= 1.0 and s["ci95"][1] <= 3.0
    assert pc.paired_stats([0.5])["std"] is None


# ----- the LR-matched control arm and validation selection -----


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("control")
    code, stdout, stderr = run_main([*TINY, "--control", "lr-matched", "--val-size", "128", "--output-dir", out])
    assert code == 0, stderr
    return out, read_json(out / "results_seed_42.json")


def test_control_arm_runs_at_the_phase_arms_mean_multiplier(control_run):
    _, results = control_run
    phase, control, cfg = results["phase_aware"], results["control"], results["config"]
    mean_mult = float(np.mean(phase["per_epoch"]["lr_mult"]))
    assert mean_mult > 1.0  # the S1 pulse was applied
    assert control["lr_mult"] == mean_mult
    for epoch, lr in enumerate(control["per_epoch"]["lr"]):
        assert lr == pytest.approx(
            pc.base_lr_at(epoch, cfg["base_lr"], cfg["warmup_epochs"], cfg["epochs"]) * mean_mult
        )
    assert "grad_accum" not in control["per_epoch"]  # accumulation 1 throughout
    assert results["delta_best_acc_vs_control"] == phase["best_acc"] - control["best_acc"]
    assert results["delta_final_acc_vs_control"] == phase["final_acc"] - control["final_acc"]
    assert results["delta_best_acc"] == phase["best_acc"] - results["baseline"]["best_acc"]


def test_validation_split_drives_the_controller_and_selection(control_run):
    out, results = control_run
    assert results["config"]["val_size"] == 128 and results["config"]["train_size"] == 256
    for name in ("baseline", "phase_aware", "control"):
        arm = results[name]
        log = arm["per_epoch"]
        assert len(log["val_loss"]) == len(log["val_acc"]) == 5
        best = int(np.argmax(log["val_acc"]))
        assert arm["selected_by"] == "validation" and arm["best_epoch"] == best
        assert arm["best_acc"] == log["eval_acc"][best] and arm["final_acc"] == log["eval_acc"][-1]
    # The controller saw validation losses: replaying them reproduces its phases.
    code, stdout, _ = run_main(["--replay", out / "results_seed_42.json", "--output-dir", out])
    assert code == 0 and "matches the phases recorded in the file" in stdout


def test_default_selects_on_the_test_split(default_run):
    _, results, _ = default_run
    assert results["baseline"]["selected_by"] == "test" and "val_loss" not in results["baseline"]["per_epoch"]


# ----- sharded seeds: one multi-seed run, shards plus --summarize, torchrun -----

SHARD_RUN = [*TINY, "--epochs", "3", "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def multi_seed_run(tmp_path_factory):
    """Seeds 7 and 3 in one process with one thread, the thread count torchrun gives each worker
    (the thread count changes the last bits of CPU convolutions)."""
    out = tmp_path_factory.mktemp("multi")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, stderr = run_main([*SHARD_RUN, "--multi-seed", "--seeds", "7,3", "--output-dir", out])
        shards = tmp_path_factory.mktemp("shards")
        for seed in (7, 3):
            assert run_main([*SHARD_RUN, "--seed", seed, "--output-dir", shards])[0] == 0
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr
    return out, shards


def test_summary_fields(multi_seed_run):
    out, _ = multi_seed_run
    summary = read_json(out / "multi_seed_summary.json")
    assert summary["seeds"] == [3, 7]
    assert summary["config"] == pc.run_identity(read_json(out / "results_seed_3.json")["config"])
    for arm in ("baseline", "phase_aware"):
        best = summary["arms"][arm]["best_acc"]
        per_seed = [read_json(out / f"results_seed_{s}.json")[arm]["best_acc"] for s in (3, 7)]
        assert best["per_seed"] == per_seed and best["mean"] == pytest.approx(np.mean(per_seed))
        assert best["std"] == pytest.approx(np.std(per_seed, ddof=1))
    comparison = summary["comparisons"]["phase_aware_vs_baseline"]
    for metric in ("best_acc", "final_acc"):
        deltas = [read_json(out / f"results_seed_{s}.json")[f"delta_{metric}"] for s in (3, 7)]
        assert comparison[metric] == pc.paired_stats(deltas)
        assert {"mean", "median", "std", "per_seed", "positive", "total", "ci95", "p_value"} <= set(comparison[metric])
    assert set(summary["transitions"]) == {"3", "7"} and "S1" in summary["transitions"]["3"]
    assert (out / "multi_seed_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_summarize_of_shards_equals_the_multi_seed_summary(multi_seed_run):
    out, shards = multi_seed_run
    assert not (shards / "multi_seed_summary.json").exists()
    code, stdout, _ = run_main(["--summarize", shards])
    assert code == 0 and "summary over seeds [3, 7]" in stdout
    assert read_json(shards / "multi_seed_summary.json") == read_json(out / "multi_seed_summary.json")
    assert (shards / "multi_seed_summary.png").exists()


def test_two_process_torchrun_equals_the_multi_seed_run(multi_seed_run, tmp_path):
    out, _ = multi_seed_run
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "phase_controller.py"), *SHARD_RUN, "--multi-seed", "--seeds", "7,3"]
    result = subprocess.run([*command, "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout
    assert read_json(tmp_path / "multi_seed_summary.json") == read_json(out / "multi_seed_summary.json")
    for seed in (3, 7):
        mine, theirs = (read_json(d / f"results_seed_{seed}.json") for d in (tmp_path, out))
        assert without_timings(mine) == without_timings(theirs)


def test_summarize_refuses_shards_with_other_settings(multi_seed_run, tmp_path):
    out, _ = multi_seed_run
    shutil.copy(out / "results_seed_3.json", tmp_path)
    other = read_json(out / "results_seed_7.json")
    other["config"]["epochs"] = 4
    (tmp_path / "results_seed_7.json").write_text(json.dumps(other))
    code, _, stderr = run_main(["--summarize", tmp_path])
    assert code == 2 and stderr.count("\n") == 1
    assert "results_seed_7.json and results_seed_3.json were run with different settings: epochs=4 vs 3" in stderr
    assert not (tmp_path / "multi_seed_summary.json").exists()


def test_summarize_without_results(tmp_path):
    code, _, stderr = run_main(["--summarize", tmp_path])
    assert code == 2 and "no results_seed_N.json files in" in stderr


# ----- replay -----


def test_replay_of_a_results_file_reproduces_its_phases(default_run, tmp_path):
    out, results, _ = default_run
    flags = ALL_PHASES[2:]  # the thresholds the run used
    code, stdout, _ = run_main(["--replay", out / "results_seed_42.json", *flags, "--output-dir", tmp_path])
    assert code == 0 and "matches the phases recorded in the file" in stdout
    replayed = read_json(tmp_path / "replay_results_seed_42.json")
    phase = results["phase_aware"]
    assert [row["phase"] for row in replayed["per_epoch"]] == phase["per_epoch"]["phase"]
    assert [row["dL"] for row in replayed["per_epoch"]] == phase["per_epoch"]["dL"]
    assert replayed["transition_epochs"] == phase["transition_epochs"]
    assert (tmp_path / "replay_results_seed_42.png").read_bytes()[:4] == b"\x89PNG"
    code, stdout, _ = run_main(["--replay", out / "results_seed_42.json", "--output-dir", tmp_path])
    assert code == 0 and "differs from the recorded phases at epochs" in stdout  # other thresholds
    assert "the run used --s2-threshold 1.0 --s3-patience 1" in stdout


def expected_phases(losses, evals=None, **settings):
    ctl = pc.PhaseController(**settings)
    return [
        (ctl.observe(loss, ev), ctl.phase)[1] for loss, ev in zip(losses, evals or [None] * len(losses), strict=True)
    ]


def test_replay_of_a_json_list(tmp_path):
    losses = [2.3, 2.2, 2.0, 1.8, 1.7, 1.699, 1.698, 1.697, 1.696]  # S1 at epoch 2, S2 at epoch 7
    path = tmp_path / "losses.json"
    path.write_text(json.dumps(losses))
    code, stdout, _ = run_main(["--replay", path, "--output-dir", tmp_path])
    assert code == 0 and "transition epoch 2: S0_EXPLORE -> S1_BOUNDARY" in stdout
    replayed = read_json(tmp_path / "replay_losses.json")
    assert [row["phase"] for row in replayed["per_epoch"]] == expected_phases(losses)
    assert replayed["per_epoch"][-1]["lr_mult"] == 0.5 and replayed["per_epoch"][-1]["grad_accum"] == 2


def test_replay_of_a_csv_with_eval_losses(tmp_path):
    # S1 at epoch 2, S2 at epoch 6, then eval losses 1.47 (best), 1.47, 1.48: two stale, S3 at epoch 9.
    losses = [2.3, 2.0, 1.7, 1.5, 1.49, 1.489, 1.488, 1.487, 1.486, 1.485]
    evals = [2.2, 1.9, 1.6, 1.5, 1.45, 1.46, 1.46, 1.47, 1.47, 1.48]
    path = tmp_path / "log.csv"
    path.write_text(
        "epoch,train_loss,eval_loss\n"
        + "".join(f"{i},{a},{b}\n" for i, (a, b) in enumerate(zip(losses, evals, strict=True)))
    )
    code, _, _ = run_main(["--replay", path, "--s3-patience", "2", "--output-dir", tmp_path])
    assert code == 0
    replayed = read_json(tmp_path / "replay_log.json")
    assert [row["phase"] for row in replayed["per_epoch"]] == expected_phases(losses, evals, s3_patience=2)
    assert replayed["transition_epochs"] == {"S1": 2, "S2": 6, "S3": 9}


def test_replay_of_a_csv_without_eval_column(tmp_path):
    path = tmp_path / "train_only.csv"
    path.write_text("train_loss\n2.0\n1.5\n1.0\n")
    code, stdout, _ = run_main(["--replay", path, "--output-dir", tmp_path])
    assert code == 0 and "S1_BOUNDARY" in stdout


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.json", None, "cannot read"),
        ("bad.json", "[1.0, 2.0", "Expecting"),
        ("words.json", '["a", "b"]', "expected a results file or a JSON list of numbers"),
        ("empty.json", "[]", "no losses in it"),
        ("nan.json", "[2.0, NaN, 1.0]", "losses must be finite numbers"),
        ("other.json", '{"some": "dict"}', "phase_aware"),
        ("no_column.csv", "loss\n1.0\n", "train_loss column"),
        ("text.csv", "train_loss\n1.0\nabc\n", "could not convert"),
        ("bad_eval.csv", "train_loss,eval_loss\n1.0,inf\n", "losses must be finite numbers"),
    ],
)
def test_bad_replay_files_give_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, _, stderr = run_main(["--replay", path, "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1 and message in stderr and f"--replay {path}" in stderr


def test_replay_settings_come_from_the_flags(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([3.0, 2.0, 1.0, 0.999]))
    run_main(["--replay", path, "--lr-pulse", "1.5", "--grad-accum", "3", "--dl-window", "2", "--output-dir", tmp_path])
    replayed = read_json(tmp_path / "replay_l.json")
    assert replayed["controller"]["lr_pulse"] == 1.5 and replayed["controller"]["dl_window"] == 2
    assert math.isclose(replayed["per_epoch"][2]["lr_mult"], 1.5)
