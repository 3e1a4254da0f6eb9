"""Honest evidence: paired statistics, the LR-matched control, validation selection,
sharded seeds (summarize and torchrun) and replay."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, free_port, read_json, run_main, table_lines, without_timings

import phase_controller as pc
from phase_cifar10 import evidence, settings, training

# ----- statistics, against hand-computed cases -----


@pytest.mark.fast
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
    assert evidence.sign_flip_p_value(deltas) == pytest.approx(p_value)


@pytest.mark.fast
@pytest.mark.parametrize(
    "deltas, low, high",
    [
        ([1.0, -1.0] * 10, 1.0, 1.0),  # mean 0: every sampled pattern is as extreme
        ([1.0] * 20, 0.0, 3 / 100_001),  # only 2 of 2^20 patterns reach |mean| 1: about 0.2 of 100,000 draws
    ],
)
def test_sign_flip_beyond_sixteen_seeds_samples_patterns(deltas, low, high):
    assert low <= evidence.sign_flip_p_value(deltas) <= high


@pytest.mark.fast
@pytest.mark.parametrize(
    "values, interval",
    [
        ([0.5, 0.5, 0.5], [0.5, 0.5]),
        ([3.0], [3.0, 3.0]),
        ([0.0, 1.0], [0.0, 1.0]),  # resample means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4
    ],
)
def test_bootstrap_interval_in_hand_computable_cases(values, interval):
    assert evidence.bootstrap_ci(values) == pytest.approx(interval)


@pytest.mark.fast
def test_bootstrap_interval_of_a_skewed_sample():
    # A resample mean of [0, 0, 0, 1] is k/4 with k ~ Binomial(4, 1/4): P(0) = 0.32, so the 2.5th
    # percentile is 0; P(k <= 2) = 0.949 and P(k <= 3) = 0.996, so the 97.5th is 3/4.
    assert evidence.bootstrap_ci([0.0, 0.0, 0.0, 1.0]) == pytest.approx([0.0, 0.75])


@pytest.mark.fast
def test_paired_stats_fields():
    s = evidence.paired_stats({42: 1.0, 7: 2.0, 137: 3.0})
    assert s["per_seed"] == {"42": 1.0, "7": 2.0, "137": 3.0} and s["mean"] == 2.0 and s["median"] == 2.0
    assert s["std"] == pytest.approx(1.0) and s["positive"] == 3 and s["total"] == 3
    assert s["p_value"] == pytest.approx(0.25) and s["ci95"][0] >= 1.0 and s["ci95"][1] <= 3.0
    assert evidence.paired_stats({5: 0.5})["std"] is None


@pytest.mark.fast
@pytest.mark.parametrize("deltas", [{1: 0.5}, {1: 0.5, 2: -0.2}])
def test_fewer_than_three_pairs_get_no_interval_and_no_p_value(deltas):
    # One pair's exact sign-flip p is 1 and two pairs' at best 0.5; a "95% CI" of one value is a point.
    s = evidence.paired_stats(deltas)
    assert s["ci95"] is None and s["p_value"] is None and s["mean"] == pytest.approx(sum(deltas.values()) / len(deltas))


# ----- the LR-matched control arm and validation selection -----


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("control")
    code, stdout, stderr = run_main([*TINY, "--control", "lr-matched", "--val-size", "128", "--output-dir", out])
    assert code == 0, stderr
    return out, read_json(out / "results_seed_42.json")


def schedule(base_lr, warmup, epochs):
    """The warmup+cosine base LRs, written out here from the README's formula."""
    return [
        base_lr * (e + 1) / warmup
        if e < warmup
        else base_lr * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
        for e in range(epochs)
    ]


def phase_log(multipliers, accumulations, batches, base_lr=0.01, warmup=2):
    """A phase arm's log and config for an epoch of `batches` micro-batches: an epoch at
    accumulation k takes ceil(batches / k) optimizer steps (counted by hand in the tests below)."""
    epochs = len(multipliers)
    lrs = [b * m for b, m in zip(schedule(base_lr, warmup, epochs), multipliers, strict=True)]
    steps = [-(-batches // k) for k in accumulations]
    log = {"lr": lrs, "lr_mult": multipliers, "accumulation": accumulations, "steps": steps}
    config = {"base_lr": base_lr, "warmup_epochs": warmup, "epochs": epochs, "batch_size": 128}
    return {"status": "ok", "per_epoch": log}, {**config, "train_size": 128 * batches}


@pytest.mark.fast
@pytest.mark.parametrize(
    "multipliers, accumulations, matched, mean",
    [
        # The example: 1.0 for epochs 0-2, the S1 pulse for 3-27, S2 (0.5, accumulation 2) for 28-29.
        ([1.0] * 3 + [1.1] * 25 + [0.5] * 2, [1] * 28 + [2] * 2, 1.0835, 1.05),
        # S2's multipliers from epoch 18 and S3's from 24: the plain mean would put the control 23% low.
        ([1.0] * 3 + [1.1] * 15 + [0.5] * 6 + [0.1] * 6, [1] * 18 + [2] * 12, 0.9824, 0.77),
    ],
)
def test_control_constant_matches_the_total_update(multipliers, accumulations, matched, mean):
    arm, cfg = phase_log(multipliers, accumulations, batches=390)  # even: accumulation 2 halves the steps
    assert training.matched_lr_mult(arm, cfg) == pytest.approx(matched, abs=5e-5)
    assert np.mean(multipliers) == pytest.approx(mean)  # what the old control used, for contrast


@pytest.mark.fast
def test_control_constant_by_hand_on_three_epochs():
    # Warmup 1 of 3 epochs: base LRs 1, 1, 0.5 (x base_lr). Four batches: 4, 4, 2 steps, so the
    # update is 1*1*4/4 + 2*1*4/4 + 0.5*0.5*2/4 = 3.125 against a sum of base LRs of 2.5.
    arm, cfg = phase_log([1.0, 2.0, 0.5], [1, 1, 2], batches=4, base_lr=1.0, warmup=1)
    assert training.matched_lr_mult(arm, cfg) == pytest.approx(1.25)


@pytest.mark.fast
def test_control_constant_counts_the_short_last_window():
    # The same epochs with three batches: accumulation 2 takes 2 steps of 3 (a short last window
    # still steps), not 1.5. Update 1 + 2 + 0.5*0.5*2/3 = 3 + 1/6; divided by 2.5: 19/15.
    arm, cfg = phase_log([1.0, 2.0, 0.5], [1, 1, 2], batches=3, base_lr=1.0, warmup=1)
    assert training.matched_lr_mult(arm, cfg) == pytest.approx(19 / 15)


@pytest.mark.fast
def test_control_constant_of_the_synthetic_example():
    # --subset 384 --epochs 7 (warmup 2): three batches of 128; the phase arm ran at 1, 1, 1, 1.1,
    # 0.5, 0.5, 0.5 with 3, 3, 3, 3, 2, 2, 2 steps. Base LRs /0.01: 0.5, 1, 1, then
    # (1 + cos(k pi / 5)) / 2 for k = 1..4: 0.904508, 0.654508, 0.345492, 0.095492; they sum to 4.5.
    # Update: 0.5 + 1 + 1 + 1.1 * 0.904508 + 0.5 * (2/3) * (0.654508 + 0.345492 + 0.095492) = 3.860123.
    arm, cfg = phase_log([1.0, 1.0, 1.0, 1.1, 0.5, 0.5, 0.5], [1, 1, 1, 1, 2, 2, 2], batches=3)
    assert arm["per_epoch"]["steps"] == [3, 3, 3, 3, 2, 2, 2]
    assert training.matched_lr_mult(arm, cfg) == pytest.approx(3.860123 / 4.5, abs=1e-6)  # 0.85780; 1/k gave 0.83752


def test_control_arm_runs_at_the_matched_constant(control_run):
    _, results = control_run
    phase, control, base = results["phase_aware"], results["control"], results["baseline"]
    # The phase arm's recorded LRs are m*b and the baseline's are b: the matched constant from the logs.
    # 256 images in batches of 64: four micro-batches, so 4 steps at accumulation 1 and 2 at 2.
    steps = phase["per_epoch"]["steps"]
    assert steps == [4 if k == 1 else 2 for k in phase["per_epoch"]["accumulation"]]
    assert base["per_epoch"]["steps"] == control["per_epoch"]["steps"] == [4] * 5
    update = sum(lr * s / 4 for lr, s in zip(phase["per_epoch"]["lr"], steps, strict=True))
    expected = update / sum(base["per_epoch"]["lr"])
    assert (
        control["fixed_lr_mult"] == pytest.approx(expected, rel=1e-12) and control["fixed_lr_mult"] > 1.0
    )  # the pulse
    assert phase["mean_lr_mult"] == pytest.approx(sum(phase["per_epoch"]["lr_mult"]) / 5)
    for lr_control, lr_base in zip(control["per_epoch"]["lr"], base["per_epoch"]["lr"], strict=True):
        assert lr_control == pytest.approx(lr_base * expected, rel=1e-12)
    assert "accumulation" not in control["per_epoch"]  # accumulation 1 throughout
    assert results["delta_best_acc_vs_control"] == phase["best_acc"] - control["best_acc"]
    assert results["delta_final_acc_vs_control"] == phase["final_acc"] - control["final_acc"]
    assert results["delta_best_acc"] == phase["best_acc"] - base["best_acc"]


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
    seeds = {s: read_json(out / f"results_seed_{s}.json") for s in (3, 7)}
    assert summary["config"] == settings.identity(seeds[3]["config"])
    for arm in ("baseline", "phase_aware"):
        best = summary["arms"][arm]["best_acc"]
        per_seed = {str(s): r[arm]["best_acc"] for s, r in seeds.items()}
        assert best["per_seed"] == per_seed and best["seeds"] == 2
        a, b = per_seed.values()
        assert best["mean"] == pytest.approx((a + b) / 2) and best["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
    comparison = summary["comparisons"]["phase_aware_vs_baseline"]
    assert comparison["pairs"] == 2 and comparison["excluded"] == []
    for metric in ("best_acc", "final_acc"):
        deltas = {str(s): r["phase_aware"][metric] - r["baseline"][metric] for s, r in seeds.items()}
        stats = comparison[metric]
        assert stats["per_seed"] == deltas and stats["total"] == 2
        assert stats["mean"] == pytest.approx(sum(deltas.values()) / 2)
        assert stats["positive"] == sum(d > 0 for d in deltas.values())
    assert set(summary["transitions"]) == {"3", "7"} and "S1" in summary["transitions"]["3"]
    assert set(summary["success_criteria"]) == {
        "positive_mean_delta", "majority_of_seeds_positive", "s1_to_s2_visible", "lr_departs_only_after_detection"
    }  # fmt: skip
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
    result = subprocess.run([*command, "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout
    assert read_json(tmp_path / "multi_seed_summary.json") == read_json(out / "multi_seed_summary.json")
    for seed in (3, 7):
        mine, theirs = (read_json(d / f"results_seed_{seed}.json") for d in (tmp_path, out))
        assert without_timings(mine) == without_timings(theirs)


def test_ranks_started_by_hand_equal_the_multi_seed_run(multi_seed_run, tmp_path):
    # Without torchrun's agent, rank 0's process hosts the store the ranks meet in, so it must not
    # end before rank 1 has read everything from it.
    out, _ = multi_seed_run
    env = {name: value for name, value in os.environ.items() if not name.startswith("TORCHELASTIC")}
    env |= {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, str(ROOT / "phase_controller.py"), *SHARD_RUN, "--multi-seed", "--seeds", "7,3"]
    ranks = [subprocess.Popen([*command, "--output-dir", str(tmp_path)], env=env | {"RANK": r, "LOCAL_RANK": r},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in "01"]  # fmt: skip
    for rank in ranks:
        stdout, stderr = rank.communicate()
        assert rank.returncode == 0 and stderr == "", stderr[-2000:]
    assert read_json(tmp_path / "multi_seed_summary.json") == read_json(out / "multi_seed_summary.json")


def test_torchrun_keeps_every_rank_until_the_summary_is_written(tmp_path):
    # Every seed's phase arm diverges (a huge S1 pulse): rank 1 must not exit, and so make torchrun
    # stop rank 0, before rank 0 has written the summary. Every rank then exits with 1.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "phase_controller.py"), *SHARD_RUN, "--epochs", "5", "--lr-pulse", "100000"]
    command += ["--multi-seed", "--seeds", "1,2", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    summary = read_json(tmp_path / "multi_seed_summary.json")
    assert summary["seeds"] == [1, 2] and summary["arms"]["phase_aware"]["status"] == {"1": "diverged", "2": "diverged"}
    assert (tmp_path / "multi_seed_summary.png").exists()
    # Both ranks report both seeds (their lines may interleave on stderr).
    assert result.stderr.count("error: 2 arm(s) diverged (seed 1 phase_aware in epoch ") == 2


def test_summarize_refuses_shards_with_other_settings(multi_seed_run, tmp_path):
    out, _ = multi_seed_run
    shutil.copy(out / "results_seed_3.json", tmp_path)
    other = read_json(out / "results_seed_7.json")
    other["config"]["lr_pulse"] = 1.5
    (tmp_path / "results_seed_7.json").write_text(json.dumps(other))
    code, _, stderr = run_main(["--summarize", tmp_path])
    assert code == 2 and stderr.count("\n") == 1
    assert (
        "results_seed_7.json and results_seed_3.json were run with different settings or data: lr_pulse 1.1 "
        "in results_seed_3.json, 1.5 in results_seed_7.json" in stderr
    )
    assert not (tmp_path / "multi_seed_summary.json").exists()


def test_summarize_without_results(tmp_path):
    code, _, stderr = run_main(["--summarize", tmp_path])
    assert code == 2 and "no results_seed_N.json files in" in stderr


# ----- summaries of crafted results files: healthy pairs and the success criteria -----

S0, S1, S2, S3 = pc.PHASES
LRS = [0.005, 0.01, 0.01, 0.009, 0.007, 0.005]  # a baseline's six recorded LRs


CONFIG = {"dataset": "synthetic", "subset": 0, "val_size": 0, "epochs": 6, "warmup_epochs": 2, "base_lr": 0.01,
          "batch_size": 64, "width": 4, "momentum": 0.9, "weight_decay": 5e-4, "precision": "fp32",
          "control": "none", "s1_threshold": -0.02, "s2_threshold": 0.005, "lr_pulse": 1.1, "grad_accum": 2,
          "s3_patience": 5, "dl_window": 3, "dl_mode": "absolute"}  # fmt: skip


def crafted(seed, baseline_final, phase_final, phases=(S0, S0, S1, S1, S2, S2), phase_lrs=None, status="ok"):
    """A results file as a run writes it, with only what a summary reads; a diverged phase arm
    logs the 3 epochs before it diverged."""
    phase_lrs = phase_lrs or [0.005, 0.01, 0.01, 0.0099, 0.0035, 0.0025]
    done = 3 if status == "diverged" else len(phases)

    def arm(final, lrs, done=6, **extra):
        accuracies = ([final - 1.0] * (len(lrs) - 1) + [final])[:done]
        per_epoch = {"train_loss": [1.0] * done, "eval_loss": [1.0] * done, "eval_acc": accuracies,
                     "lr": lrs[:done], **{k: v[:done] for k, v in extra.items()}}  # fmt: skip
        return {"status": "ok", "best_acc": accuracies[-1], "final_acc": accuracies[-1], "best_epoch": done - 1,
                "per_epoch": per_epoch}  # fmt: skip

    phase = arm(phase_final, phase_lrs, done, phase=list(phases))
    phase["transition_epochs"] = {p[:2]: phases.index(p) for p in (S1, S2, S3) if p in phases[:done]}
    if status == "diverged":
        phase.update(status="diverged", diverged_epoch=done)
    baseline = arm(baseline_final, LRS) | {"fixed_lr_mult": 1.0}
    return {"config": CONFIG | {"seed": seed}, "baseline": baseline, "phase_aware": phase}


def summarize(tmp_path, files):
    for results in files:
        (tmp_path / f"results_seed_{results['config']['seed']}.json").write_text(json.dumps(results))
    code, stdout, stderr = run_main(["--summarize", tmp_path])
    assert code == 0, stderr
    return read_json(tmp_path / "multi_seed_summary.json"), stdout


def test_a_diverged_pair_is_excluded_and_deltas_keep_their_seeds(tmp_path):
    results_files = [crafted(1, 50.0, 51.5), crafted(2, 50.0, 20.0, status="diverged"), crafted(3, 60.0, 59.5)]
    summary, stdout = summarize(tmp_path, results_files)
    comparison = summary["comparisons"]["phase_aware_vs_baseline"]
    assert comparison["pairs"] == 2
    assert comparison["excluded"] == [{"seed": 2, "reason": "phase_aware diverged in epoch 4"}]
    final = comparison["final_acc"]
    assert final["per_seed"] == {"1": 1.5, "3": -0.5} and final["mean"] == pytest.approx(0.5)
    assert final["total"] == 2 and final["positive"] == 1
    assert summary["arms"]["phase_aware"]["final_acc"]["per_seed"] == {"1": 51.5, "2": None, "3": 59.5}
    assert summary["arms"]["phase_aware"]["final_acc"]["mean"] == pytest.approx(55.5)
    assert summary["arms"]["baseline"]["final_acc"]["mean"] == pytest.approx(160 / 3)
    assert "phase_aware_vs_baseline: seed 2 excluded (phase_aware diverged in epoch 4)" in stdout
    assert "phase_aware_vs_baseline final_acc: mean +0.50 points, 1/2 healthy pairs positive" in stdout
    assert final["ci95"] is None and final["p_value"] is None and "95% CI" not in stdout and "p =" not in stdout
    assert stdout.count("no interval or p-value: 2 pair(s) cannot tell an effect from seed noise") == 1
    assert stdout.rstrip().endswith(
        f"wrote {tmp_path / 'multi_seed_summary.json'}, multi_seed_summary.md and multi_seed_summary.png"
    )
    # Its table: the diverged arm named where its accuracy would be, its pair left out of the deltas,
    # no interval or p from two pairs, and each phase's epoch counted from 1 (S1 was entered at
    # index 2, S2 at 4; seed 2 diverged before S2).
    table = table_lines((tmp_path / "multi_seed_summary.md").read_text())
    assert table == [
        "| seed | baseline final | phase_aware final | Δ vs baseline | S1 after epoch | S2 after epoch | S3 after epoch"
        " |",
        "|---|---|---|---|---|---|---|",
        "| 1 | 50.00 | 51.50 | +1.50 | 3 | 5 | never |",
        "| 2 | 50.00 | diverged |  | 3 | never | never |",
        "| 3 | 60.00 | 59.50 | -0.50 | 3 | 5 | never |",
        "| **mean** | 53.33 | 55.50 | +0.50, 2 | 3 of 3 | 2 of 3 | 0 of 3 |",
    ]


def test_no_healthy_pair_gives_no_statistics(tmp_path):
    summary, stdout = summarize(tmp_path, [crafted(4, 50.0, 10.0, status="diverged")])
    comparison = summary["comparisons"]["phase_aware_vs_baseline"]
    assert comparison["pairs"] == 0 and comparison["best_acc"] is None and comparison["final_acc"] is None
    criteria = summary["success_criteria"]
    assert not criteria["positive_mean_delta"]["met"] and not criteria["majority_of_seeds_positive"]["met"]
    assert "no seed with both arms healthy" in stdout


@pytest.mark.parametrize(
    "finals, mean_met, majority_met",
    [
        ([(50.0, 51.0), (50.0, 52.0), (50.0, 49.5)], True, True),  # +1, +2, -0.5
        ([(50.0, 53.0), (50.0, 49.0), (50.0, 49.0)], True, False),  # mean +0.33 but one seed of three
        ([(50.0, 49.0), (50.0, 50.5), (50.0, 49.0)], False, False),  # mean -0.5, one of three
        ([(50.0, 49.0), (50.0, 51.0)], False, False),  # mean 0 is not positive; half is not a majority
    ],
)
def test_criteria_on_the_deltas(tmp_path, finals, mean_met, majority_met):
    summary, _ = summarize(tmp_path, [crafted(s, b, p) for s, (b, p) in enumerate(finals)])
    criteria = summary["success_criteria"]
    assert criteria["positive_mean_delta"]["met"] is mean_met
    assert criteria["majority_of_seeds_positive"]["met"] is majority_met
    assert criteria["positive_mean_delta"]["pairs"] == len(finals)


@pytest.mark.parametrize(
    "phases, visible, applied",
    [
        ((S0, S0, S1, S1, S2, S2), True, 1),  # S2 after epoch 4: applied in epoch 5
        ((S0, S0, S1, S2, S2, S3), True, 2),
        ((S0, S0, S1, S1, S1, S2), False, 0),  # entered after the last epoch: never applied
        ((S0, S0, S1, S1, S1, S1), False, 0),
    ],
)
def test_criterion_s1_to_s2_visible(tmp_path, phases, visible, applied):
    summary, _ = summarize(tmp_path, [crafted(1, 50.0, 51.0, phases=phases), crafted(2, 50.0, 51.0)])
    criterion = summary["success_criteria"]["s1_to_s2_visible"]
    assert criterion["per_seed"]["1"]["met"] is visible
    assert criterion["per_seed"]["1"]["epochs_at_s2_multipliers"] == applied
    assert criterion["met"] is visible and criterion["seeds_met"] == 1 + visible


@pytest.mark.parametrize(
    "phases, phase_lrs, met",
    [
        ((S0, S0, S1, S1, S2, S2), [0.005, 0.01, 0.01, 0.0099, 0.0035, 0.0025], True),  # S1 at 2, departs at 3
        ((S0, S0, S1, S1, S2, S2), [0.005, 0.01, 0.011, 0.0099, 0.0035, 0.0025], False),  # departs at 2
        ((S0, S0, S0, S0, S0, S0), [0.005, 0.01, 0.01, 0.009, 0.007, 0.0051], False),  # no detection at all
        ((S0, S0, S0, S0, S0, S0), LRS, True),  # never departs
    ],
)
def test_criterion_lr_departs_only_after_detection(tmp_path, phases, phase_lrs, met):
    summary, _ = summarize(tmp_path, [crafted(1, 50.0, 51.0, phases=phases, phase_lrs=phase_lrs)])
    criterion = summary["success_criteria"]["lr_departs_only_after_detection"]
    assert criterion["met"] is met and criterion["per_seed"]["1"]["met"] is met


def test_single_seed_run_prints_its_criteria(default_run):
    _, results, stdout = default_run
    delta = results["phase_aware"]["final_acc"] - results["baseline"]["final_acc"]
    verdict = "    met" if delta > 0 else "NOT met"
    assert f"seed 42 criterion [{verdict}] positive delta: final_acc delta {delta:+.2f} points" in stdout
    # The tiny run enters S2 after epoch 3, so its multipliers apply in epochs 4 and 5.
    visible = "s1 to s2 visible: S2 entered after epoch 4, its multipliers applied in 2 epoch(s)"
    assert f"seed 42 criterion [    met] {visible}" in stdout
    assert "seed 42 criterion [    met] lr departs only after detection" in stdout
