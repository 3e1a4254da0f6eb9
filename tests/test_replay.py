"""Replay: the controller over logged loss curves, results files, JSON lists and CSVs as people write them."""

import json
import math

import pytest
from helpers import ALL_PHASES, cli, read_json, run_main

import phase_controller as pc

S0, S1, S2, S3 = pc.PHASES


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
    assert code == 0 and "differs from the recorded phases after epochs" in stdout  # other thresholds
    assert "the run used --s2-threshold 1.0 --s3-patience 1" in stdout
    assert read_json(tmp_path / "replay_results_seed_42.json")["arm"] == "phase_aware"


def test_replay_of_a_results_files_baseline_curve(default_run, tmp_path):
    out, results, _ = default_run
    flags = ["--replay", out / "results_seed_42.json", "--replay-arm", "baseline", "--output-dir", tmp_path]
    code, stdout, _ = run_main([*flags, "--s1-threshold", "1.0"])
    assert code == 0 and "its baseline arm" in stdout
    assert "recorded phases" not in stdout  # the baseline ran without a controller: nothing to compare
    replayed = read_json(tmp_path / "replay_results_seed_42_baseline.json")
    baseline = results["baseline"]["per_epoch"]
    assert replayed["arm"] == "baseline"
    assert [row["train_loss"] for row in replayed["per_epoch"]] == baseline["train_loss"]
    # Without --val-size the held-out loss is the test split's.
    assert [row["eval_loss"] for row in replayed["per_epoch"]] == baseline["eval_loss"]
    assert baseline["train_loss"] != results["phase_aware"]["per_epoch"]["train_loss"]  # a curve of its own
    # The default window of 3: dL after the last epoch is the mean of the last three differences.
    losses = baseline["train_loss"]
    assert replayed["per_epoch"][-1]["dL"] == pytest.approx((losses[-1] - losses[-4]) / 3, rel=1e-12)
    assert replayed["transition_epochs"] == {"S1": 2}  # any slope is below 1.0: S1 once 3 losses are seen
    assert (tmp_path / "replay_results_seed_42_baseline.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "content, message",
    [
        ("[2.0, 1.0]", "--replay-arm picks an arm of a results file; this file holds one curve"),
        (None, "it holds no control arm, only baseline, phase_aware (--replay-arm)"),
    ],
    ids=["a-list", "an-arm-not-run"],
)
def test_replay_of_an_arm_a_file_lacks_is_one_line(default_run, tmp_path, content, message):
    path = default_run[0] / "results_seed_42.json"
    if content is not None:
        path = tmp_path / "losses.json"
        path.write_text(content)
    code, _, stderr = run_main(["--replay", path, "--replay-arm", "control", "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "out").exists()


def test_replay_of_a_json_list(tmp_path):
    # dL at epoch 2 is (2.0 - 2.3) / 2 = -0.15: S1. |dL| first drops below 0.005 at epoch 7: (1.697 - 1.7) / 3.
    losses = [2.3, 2.2, 2.0, 1.8, 1.7, 1.699, 1.698, 1.697, 1.696]
    path = tmp_path / "losses.json"
    path.write_text(json.dumps(losses))
    code, stdout, _ = run_main(["--replay", path, "--output-dir", tmp_path])
    assert code == 0 and "transition after epoch 3: S0_EXPLORE -> S1_BOUNDARY" in stdout
    replayed = read_json(tmp_path / "replay_losses.json")
    assert [row["phase"] for row in replayed["per_epoch"]] == [S0, S0, S1, S1, S1, S1, S1, S2, S2]
    assert replayed["per_epoch"][-1]["lr_mult"] == 0.5 and replayed["per_epoch"][-1]["accumulation"] == 2


# S1 at epoch 2, S2 at epoch 6, then eval losses 1.47 (best), 1.47, 1.48: two stale, S3 at epoch 9.
CSV_LOSSES = [2.3, 2.0, 1.7, 1.5, 1.49, 1.489, 1.488, 1.487, 1.486, 1.485]
CSV_EVALS = [2.2, 1.9, 1.6, 1.5, 1.45, 1.46, 1.46, 1.47, 1.47, 1.48]


def csv_rows(template, evals=CSV_EVALS):
    return "".join(
        template.format(i, a, "" if b is None else b) for i, (a, b) in enumerate(zip(CSV_LOSSES, evals, strict=True))
    )


@pytest.mark.parametrize(
    "text",
    [
        "epoch,train_loss,eval_loss\n" + csv_rows("{},{},{}\n"),
        "\ufeffepoch,train_loss,eval_loss\r\n" + csv_rows("{},{},{}\r\n"),  # spreadsheet: BOM, CRLF
        "epoch, train_loss, eval_loss\n" + csv_rows("{}, {} , {}\n"),  # spaces around names and values
        '"epoch","train_loss","eval_loss"\n' + csv_rows('"{}","{}","{}"\n'),  # quoted
        "train_loss,eval_loss,epoch\n\n" + csv_rows("{1},{2},{0}\n"),  # other column order, a blank line
    ],
    ids=["plain", "bom-crlf", "spaces", "quoted", "reordered"],
)
def test_replay_reads_csv_as_people_write_it(tmp_path, text):
    path = tmp_path / "log.csv"
    path.write_bytes(text.encode())
    code, _, stderr = run_main(["--replay", path, "--s3-patience", "2", "--output-dir", tmp_path])
    assert code == 0, stderr
    replayed = read_json(tmp_path / "replay_log.json")
    assert [row["train_loss"] for row in replayed["per_epoch"]] == CSV_LOSSES
    assert [row["eval_loss"] for row in replayed["per_epoch"]] == CSV_EVALS
    assert [row["phase"] for row in replayed["per_epoch"]] == [S0, S0, S1, S1, S1, S1, S2, S2, S2, S3]
    assert replayed["transition_epochs"] == {"S1": 2, "S2": 6, "S3": 9}


def test_replay_csv_with_a_partly_empty_eval_column(tmp_path):
    # Without eval losses at epochs 7 and 8 only 1.47 (best) and 1.48 are seen in S2: no S3 at patience 2.
    evals = [*CSV_EVALS[:7], None, None, CSV_EVALS[9]]
    path = tmp_path / "gaps.csv"
    path.write_text("epoch,train_loss,eval_loss\n" + csv_rows("{},{},{}\n", evals))
    code, _, stderr = run_main(["--replay", path, "--s3-patience", "2", "--output-dir", tmp_path])
    assert code == 0, stderr
    replayed = read_json(tmp_path / "replay_gaps.json")
    assert [row["eval_loss"] for row in replayed["per_epoch"]] == evals
    assert replayed["transition_epochs"] == {"S1": 2, "S2": 6}


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
        ("words.json", '["a", "b"]', 'item 0 of the list is "a", not a finite number'),
        ("booleans.json", "[2.0, true, 1.0]", "item 1 of the list is true, not a finite number"),
        ("losses.txt", "train_loss\n1.0\n", "read as JSON because its suffix is not .csv, but it is not JSON"),
        ("separators.csv", ",,,\n,,\n", "needs a train_loss column in its header, found only separators"),
        ("empty.json", "[]", "no losses in it"),
        ("blank.json", "", "the file is empty"),
        ("nan.json", "[2.0, NaN, 1.0]", "item 1 of the list is NaN, not a finite number"),
        ("other.json", '{"some": "dict"}', "expected a results_seed_N.json file or a JSON list of numbers"),
        ("partial.json", '{"config": {}, "phase_aware": {"status": "ok"}}', "config lacks 'dataset'"),
        (
            "no_column.csv",
            "loss\n1.0\n",
            "read as CSV because of its .csv suffix: needs a train_loss column in its header, found loss",
        ),
        ("header_only.csv", "train_loss,eval_loss\n", "no rows under the header"),
        ("blank.csv", "\n\n", "the file is empty"),
        ("text.csv", "train_loss\n1.0\nabc\n", "row 2: train_loss 'abc' is not a number"),
        ("text_eval.csv", "train_loss,eval_loss\n1.0,0.5\n0.9,n/a\n", "row 2: eval_loss 'n/a' is not a number"),
        ("missing_cell.csv", "train_loss,eval_loss\n1.0,0.9\n,0.8\n", "row 2 has no train_loss"),
        ("short_row.csv", "epoch,train_loss\n0,1.0\n1\n", "row 2 has no train_loss"),
        ("bad_eval.csv", "train_loss,eval_loss\n1.0,inf\n", "losses must be finite numbers"),
        ("utf16.csv", "train_loss\n1.0\n".encode("utf-16"), "not UTF-8 text"),
        ("binary.json", bytes(range(256)), "not UTF-8 text"),
    ],
)
def test_bad_replay_files_give_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, stderr = run_main(["--replay", path, "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1 and message in stderr and f"--replay {path}" in stderr


def test_replay_of_a_zero_loss_with_a_relative_slope_is_one_line(tmp_path):
    path = tmp_path / "zero.json"
    path.write_text("[1.0, 0.5, 0.0]")
    code, _, stderr = run_main(["--replay", path, "--dl-mode", "relative", "--output-dir", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1 and "epoch 3 has 0.0" in stderr
    assert not (tmp_path / "out").exists()


def test_bad_replay_file_in_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\x00\xff\xfe\x80" * 64)
    result = cli("--replay", path, "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not UTF-8 text" in result.stderr


def test_replay_settings_come_from_the_flags(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([3.0, 2.0, 1.0, 0.999]))
    run_main(["--replay", path, "--lr-pulse", "1.5", "--grad-accum", "3", "--dl-window", "2", "--output-dir", tmp_path])
    replayed = read_json(tmp_path / "replay_l.json")
    assert replayed["controller"]["lr_pulse"] == 1.5 and replayed["controller"]["dl_window"] == 2
    assert math.isclose(replayed["per_epoch"][2]["lr_mult"], 1.5)
