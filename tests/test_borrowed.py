"""The borrowed arm (--control borrowed): the phase arm's schedule at the next seed's timing.

Its expectations come from what the arm is, not from its code: a schedule is what an arm trains
on, so a borrowed arm whose donor never left S0 trains as the baseline does, and one whose donor
changed phase at the seed's own epochs trains as the seed's phase arm does, number for number."""

import pytest
from helpers import TINY, interrupt_after, read_json, results_files, run_main

from phase_cifar10 import launch, records
from phase_cifar10.training import BorrowedTiming
from phase_controller import S0_EXPLORE, S1_BOUNDARY, S2_AXIS_LOCK, S3_POLISH, PhaseController

# On the tiny synthetic data with these thresholds, seeds 1 and 3 enter S1 after epoch 3 and seed
# 2 never leaves S0 (the test below checks that first). Seed 1 borrows seed 2's timing, seed 2
# seed 3's, seed 3 seed 1's.
RUN = [*TINY, "--epochs", "6", "--s1-threshold", "-0.06", "--s2-threshold", "0.03", "--seeds", "1,2,3"]
DONORS = {1: 2, 2: 3, 3: 1}
ARMS_EPOCHS = 3 * 3 * 6  # three seeds of three arms
LOGS = ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "steps")


@pytest.fixture(scope="module")
def borrowed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("borrowed")
    code, stdout, stderr = run_main([*RUN, "--control", "borrowed", "--output-dir", out])
    assert code == 0, stderr
    return out, {seed: read_json(out / f"results_seed_{seed}.json") for seed in DONORS}, stdout


def same_numbers(a, b):
    return {key: a["per_epoch"][key] for key in LOGS} == {key: b["per_epoch"][key] for key in LOGS}


def test_the_seeds_differ_in_timing(borrowed_run):
    _, results, _ = borrowed_run
    assert [results[seed]["phase_aware"]["transition_epochs"] for seed in (1, 2, 3)] == [{"S1": 2}, {}, {"S1": 2}]


def test_a_borrowed_arm_trains_at_its_donors_phases(borrowed_run):
    _, results, stdout = borrowed_run
    for seed, donor in DONORS.items():
        borrowed, donor_arm = results[seed]["borrowed"], results[donor]["phase_aware"]
        assert borrowed["borrowed_from"] == donor
        for key in ("phase", "lr_mult", "accumulation"):
            assert borrowed["per_epoch"][key] == donor_arm["per_epoch"][key]
        assert borrowed["transition_epochs"] == donor_arm["transition_epochs"]
        assert f"seed {seed} borrowed follows seed {donor}'s timing" in stdout
    # Seed 2 never left S0 on its own; borrowing seed 3's timing it trains 10% above its baseline
    # from the epoch after the detection on: the base schedule times S1's pulse.
    seed2 = results[2]
    base_lr, borrowed_lr = seed2["baseline"]["per_epoch"]["lr"], seed2["borrowed"]["per_epoch"]["lr"]
    assert borrowed_lr[:3] == base_lr[:3]
    assert borrowed_lr[3:] == pytest.approx([1.1 * lr for lr in base_lr[3:]], rel=1e-12)


def test_a_donor_that_never_left_s0_makes_the_baseline(borrowed_run):
    _, results, _ = borrowed_run
    assert same_numbers(results[1]["borrowed"], results[1]["baseline"])  # seed 2 never left S0


def test_a_donor_with_the_seeds_own_timing_makes_its_phase_arm(borrowed_run):
    _, results, _ = borrowed_run
    assert same_numbers(results[3]["borrowed"], results[3]["phase_aware"])  # seed 1 entered S1 when seed 3 did


def test_the_summary_compares_the_phase_arm_with_the_borrowed_arm(borrowed_run):
    out, results, _ = borrowed_run
    summary = read_json(out / "multi_seed_summary.json")
    compared = summary["comparisons"]["phase_aware_vs_borrowed"]
    deltas = {str(s): r["phase_aware"]["final_acc"] - r["borrowed"]["final_acc"] for s, r in results.items()}
    assert compared["pairs"] == 3 and compared["final_acc"]["per_seed"] == pytest.approx(deltas)
    for seed, r in results.items():
        assert r["delta_final_acc_vs_borrowed"] == pytest.approx(deltas[str(seed)])


def test_arms_at_once_equal_one_at_a_time(borrowed_run, tmp_path):
    out, _, _ = borrowed_run
    code, _, stderr = run_main([*RUN, "--control", "borrowed", "--concurrent-arms", "4", "--output-dir", tmp_path])
    assert code == 0, stderr
    assert results_files(tmp_path) == results_files(out)


def test_a_run_cut_off_continues_with_resume(borrowed_run, tmp_path, monkeypatch):
    # One at a time: seed 1's baseline and phase arm, seed 2's, then seed 1's borrowed arm (its
    # donor's phase arm is done), seed 3's baseline and phase arm, seed 2's borrowed arm: cut in its
    # third epoch, seed 1 is finished and seed 2's borrowed arm has two epochs checkpointed.
    interrupt_after(monkeypatch, epochs=45)
    code, _, _ = run_main([*RUN, "--control", "borrowed", "--output-dir", tmp_path])
    monkeypatch.undo()
    assert code == 130
    assert (tmp_path / "results_seed_1.json").exists() and not (tmp_path / "results_seed_2.json").exists()
    assert (tmp_path / "checkpoint_seed_2_borrowed.pt").exists()
    # Seeds in another order change who borrows from whom: refused in one line, finished or not.
    for seeds, seed, donor, now in (("1,3,2", 1, 2, 3), ("2,1,3", 2, 3, 1)):
        code, _, stderr = run_main([*RUN, "--control", "borrowed", "--seeds", seeds, "--resume", "--output-dir",
                                    tmp_path])  # fmt: skip
        assert code == 2 and f"seed {seed}'s borrowed arm in {tmp_path} follows seed {donor}'s timing" in stderr
        assert f"it borrows seed {now}'s" in stderr and stderr.count("\n") == 1
    # Seed 3's borrowed arm follows seed 1, whose phase arm is now read from its results file.
    code, stdout, stderr = run_main([*RUN, "--control", "borrowed", "--resume", "--output-dir", tmp_path])
    assert code == 0, stderr
    assert "seed 2 borrowed: resumed after epoch 2" in stdout
    out, _, _ = borrowed_run
    assert results_files(tmp_path) == results_files(out)


def test_a_diverged_donor_leaves_the_borrowed_arm_not_run(tmp_path):
    argv = [*TINY, "--lr-pulse", "100000", "--control", "borrowed", "--seeds", "1,2", "--output-dir", tmp_path]
    code, stdout, stderr = run_main(argv)
    assert code == 1 and "2 arm(s) diverged" in stderr
    for seed, donor in ((1, 2), (2, 1)):
        results = read_json(tmp_path / f"results_seed_{seed}.json")
        borrowed, donor_phase = results["borrowed"], read_json(tmp_path / f"results_seed_{donor}.json")["phase_aware"]
        assert donor_phase["status"] == "diverged"
        assert borrowed["status"] == "not_run" and borrowed["borrowed_from"] == donor
        assert borrowed["reason"] == f"seed {donor}'s phase_aware diverged in epoch {donor_phase['diverged_epoch'] + 1}"
        assert f"seed {seed} borrowed: not run (seed {donor}'s phase_aware diverged" in stdout
    summary = read_json(tmp_path / "multi_seed_summary.json")
    assert summary["comparisons"]["phase_aware_vs_borrowed"]["pairs"] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--control", "borrowed"], "--control borrowed: a seed borrows the next seed's timing, so it needs two seeds"),
        (["--control", "lr-matched+borrowed", "--seed", "7"], "needs two seeds or more"),
        (["--control", "borrowed+lr-matched", "--seeds", "1,2"], "argument --control: invalid choice"),
    ],
)
def test_borrowing_needs_two_seeds_and_says_so(argv, message, tmp_path):
    code, _, stderr = run_main([*TINY, *argv, "--output-dir", tmp_path])
    assert code == 2 and message in stderr and stderr.count("\n") == 1


def test_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    settings = launch.Settings.from_command_line([*TINY, "--control", "borrowed", "--seeds", "1,2"])
    with pytest.raises(launch.UserError, match="its seeds train in one process: start it without torchrun"):
        launch.start(settings)


def test_a_results_file_with_a_borrowed_arm_its_config_does_not_ask_for_is_refused(borrowed_run):
    _, results, _ = borrowed_run
    edited = dict(results[1], config=results[1]["config"] | {"control": "none"})
    with pytest.raises(records.BadRecord, match="a borrowed arm, but config's control is 'none'"):
        records.check_results(edited)
    edited = dict(results[1], borrowed={k: v for k, v in results[1]["borrowed"].items() if k != "borrowed_from"})
    with pytest.raises(records.BadRecord, match="borrowed borrowed_from None"):
        records.check_results(edited)


# ----- the controller -----


def phases_after_each(controller, losses):
    return [(controller.observe(loss), controller.phase)[1] for loss in losses]


def test_borrowed_timing_enters_each_phase_at_the_given_epochs_whatever_the_losses():
    flat = [1.0] * 7  # dL 0: the phase arm's own rules would enter nothing
    timing = BorrowedTiming(5, {"S1": 1, "S2": 3, "S3": 4}, s1_threshold=-0.02, s2_threshold=0.005)
    assert phases_after_each(timing, flat) == [S0_EXPLORE, S1_BOUNDARY, S1_BOUNDARY, S2_AXIS_LOCK, S3_POLISH,
                                               S3_POLISH, S3_POLISH]  # fmt: skip
    assert timing.transition_epochs == {"S1": 1, "S2": 3, "S3": 4} and timing.recommendation() == (0.1, 2)
    assert "as seed 5's phase arm did" in timing.transitions[0]
    own = PhaseController()
    assert phases_after_each(own, flat) == [S0_EXPLORE] * 7


def test_borrowed_timing_restores_its_own_timing_only():
    timing = BorrowedTiming(2, {"S1": 2, "S2": 4})
    phases_after_each(timing, [2.0, 1.9, 1.8, 1.7])
    state = timing.state_dict()
    restored = BorrowedTiming(2, {"S1": 2, "S2": 4})
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    for other in (BorrowedTiming(3, {"S1": 2, "S2": 4}), BorrowedTiming(2, {"S1": 1, "S2": 4})):
        before = other.state_dict()
        with pytest.raises(ValueError, match="it followed seed 2's timing"):
            other.load_state_dict(state)
        assert other.state_dict() == before
    strayed = state | {"phase": S0_EXPLORE, "transition_epochs": {}, "transitions": []}  # S1 was due after epoch 3
    with pytest.raises(ValueError, match="entering {}"):
        BorrowedTiming(2, {"S1": 2, "S2": 4}).load_state_dict(strayed)
