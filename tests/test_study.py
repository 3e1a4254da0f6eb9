"""A study: every cell is the multi-seed run of its settings, its table says what the cells'
summaries say, a study cut off continues with --resume, and a bad grid is one line."""

import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY, interrupt_after, read_json, results_files, run_main

from phase_cifar10 import launch, study
from phase_cifar10.files import UserError
from phase_cifar10.settings import Settings

SEEDS = ["--seeds", "1,2,3"]
GRID = ["--vary", "base_lr=0.01,0.04"]
RUN = [*TINY, "--epochs", "2", "--val-size", "64", "--s2-threshold", "1.0", *SEEDS]
CELLS = ["base_lr=0.01", "base_lr=0.04"]


def run_study(*argv):
    return study.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def whole_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert run_study("--output-dir", out, *GRID, *RUN) == 0
    return out


def test_a_cell_holds_what_the_multi_seed_run_of_its_settings_writes(whole_study, tmp_path):
    code, _, stderr = run_main([*RUN, "--base-lr", "0.04", "--output-dir", tmp_path])
    assert code == 0, stderr
    assert results_files(whole_study / "base_lr=0.04") == results_files(tmp_path)
    assert read_json(whole_study / "base_lr=0.01" / "results_seed_1.json")["config"]["base_lr"] == 0.01


def test_the_table_says_what_the_cells_summaries_say(whole_study):
    table = (whole_study / "study.md").read_text()
    lines = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    head, rows = lines[0], lines[1:]
    # The columns of the arms trained, and no other: these cells have no control.
    assert head == ["cell", "seeds", "baseline final", "phase_aware final", "Δ vs baseline (95% CI), p, pairs",
                    "S1 after epoch", "S2 after epoch", "S3 after epoch"]  # fmt: skip
    rows = [dict(zip(head, row, strict=True)) for row in rows]
    assert [row["cell"] for row in rows] == CELLS
    for row, cell in zip(rows, CELLS, strict=True):
        summary = read_json(whole_study / cell / "multi_seed_summary.json")
        assert row["seeds"] == "3"
        for arm in ("baseline", "phase_aware"):
            assert float(row[f"{arm} final"]) == pytest.approx(summary["arms"][arm]["final_acc"]["mean"], abs=0.005)
        compared = summary["comparisons"]["phase_aware_vs_baseline"]["final_acc"]
        numbers = re.findall(r"[-+]?\d+\.\d+", row["Δ vs baseline (95% CI), p, pairs"])
        delta, low, high, p = (float(x) for x in numbers[:4])
        assert delta == pytest.approx(compared["mean"], abs=0.005)
        assert (low, high) == pytest.approx(tuple(compared["ci95"]), abs=0.005)
        assert p == pytest.approx(compared["p_value"], abs=0.0005)
        for phase in ("S1", "S2", "S3"):
            found = [summary["transitions"][str(seed)] for seed in (1, 2, 3)]
            expected = [str(t[phase] + 1) if phase in t else "never" for t in found]  # 1-based, seed by seed
            assert row[f"{phase} after epoch"] == " ".join(expected)
    assert read_json(whole_study / "study.json")["cells"][0]["cell"] == "base_lr=0.01"
    assert (whole_study / "study.png").stat().st_size > 0


def test_the_table_gives_each_seeds_detections_one_based_s3_included(whole_study):
    # The tiny cells detect no phase: give the first cell's seeds detections by hand (0-based epochs).
    summary = read_json(whole_study / CELLS[0] / "multi_seed_summary.json")
    summary["transitions"] = {"1": {"S1": 2, "S2": 5, "S3": 11}, "2": {"S1": 2}, "3": {"S1": 3, "S2": 9}}
    table = study.study_table([study.study_row("by hand", summary)])
    row = next(line for line in table.splitlines() if line.startswith("| by hand |"))
    assert row.endswith(" | 3 3 4 | 6 never 10 | 12 never never |")


def arm(val_acc, final_acc, status="ok"):
    """An arm's record as a results file holds it, with what best_cells reads."""
    record = {"status": status, "final_acc": final_acc, "per_epoch": {"val_acc": val_acc}}
    return record | ({"diverged_epoch": 1} if status == "diverged" else {})


def test_each_arms_best_cell_is_chosen_on_validation_and_the_bests_are_paired_by_seed():
    by_cell = {  # cell: {seed: (baseline, phase_aware)}
        # The baseline's best test accuracy, but not its best validation accuracy after the last epoch
        # (the 99 is an earlier epoch's): not chosen.
        "A": {1: (arm([99, 60], 70), arm([64], 66)), 2: (arm([1, 62], 70), arm([64], 67)),
              3: (arm([1, 64], 70), arm([64], 69))},
        "B": {1: (arm([63], 65), arm([61], 80)), 2: (arm([63], 66), arm([61], 80)), 3: (arm([63], 67), arm([61], 80))},
        # The highest validation accuracy, but the baseline diverged on seed 3: not a candidate for it.
        "C": {1: (arm([70], 90), arm([50], 50)), 2: (arm([70], 90), arm([50], 50)),
              3: (arm([70], 90, "diverged"), arm([50], 50))},
    }  # fmt: skip
    results = {cell: {seed: {"baseline": b, "phase_aware": p} for seed, (b, p) in seeds.items()}
               for cell, seeds in by_cell.items()}  # fmt: skip
    best = study.best_cells(results)
    assert best["baseline"] == {"cell": "B", "val_acc": 63} and best["phase_aware"] == {"cell": "A", "val_acc": 64}
    compared = best["final_acc"]  # phase_aware in A minus baseline in B: 66-65, 67-66, 69-67
    assert compared["per_seed"] == {"1": 1, "2": 1, "3": 2} and compared["mean"] == pytest.approx(4 / 3)
    assert compared["p_value"] == 2 / 8  # of the 8 sign patterns, only all + and all - reach |4/3|
    assert study.best_cells({"A": results["A"]}) is None  # one cell: nothing to choose
    no_val = {cell: {seed: {name: arm_ | {"per_epoch": {}} for name, arm_ in r.items()} for seed, r in seeds.items()}
              for cell, seeds in results.items()}  # fmt: skip
    assert study.best_cells(no_val) is None  # without --val-size the test split would choose
    assert study.best_cells(results | {"D": no_val["A"]}) is None  # nor when only some cells have one


def test_the_study_states_each_arms_best_cell(whole_study):
    best = read_json(whole_study / "study.json")["best"]
    assert {best["baseline"]["cell"], best["phase_aware"]["cell"]} <= set(CELLS)
    assert best["final_acc"]["total"] == 3
    chosen = f"baseline at {best['baseline']['cell']} ({best['baseline']['val_acc']:.2f})"
    assert chosen in (whole_study / "study.md").read_text()


def test_a_study_cut_off_continues_with_resume(whole_study, tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, epochs=7)  # within the second cell's seeds
    assert run_study("--output-dir", tmp_path, *GRID, *RUN) == 130
    monkeypatch.undo()
    assert run_study("--output-dir", tmp_path, *GRID, *RUN) == 2  # refused: --resume or --restart
    finished = {(cell, path.stem[-1]) for cell in CELLS for path in (tmp_path / cell).glob("results_seed_*.json")}
    capsys.readouterr()
    assert run_study("--output-dir", tmp_path, *GRID, *RUN, "--resume") == 0
    skipped = re.findall(r"^(\S+): seed (\d): results_seed_\d.json exists with these settings; skipped",
                         capsys.readouterr().out, re.M)  # fmt: skip
    assert finished and sorted(skipped) == sorted(finished)  # each line names its seed's cell
    for cell in CELLS:
        assert results_files(tmp_path / cell) == results_files(whole_study / cell)
    assert (tmp_path / "study.md").read_text() == (whole_study / "study.md").read_text()


@pytest.mark.parametrize(
    "grid, message",
    [
        (["--vary", "widht=4,8"], "cell widht=4: unrecognized arguments: --widht 4"),
        (["--vary", "base_lr=0.01", "--vary", "base-lr=0.02"], "give NAME=V1,V2,... once per setting"),
        (["--vary", "base_lr"], "give NAME=V1,V2,... once per setting"),
        (["--vary", "epochs=2,zero"], "cell epochs=zero: argument --epochs"),
        (["--vary"], "argument --vary: expected one argument"),
    ],
)
def test_a_bad_grid_is_one_line(tmp_path, grid, message):
    done = subprocess.run(
        [sys.executable, "-m", "phase_cifar10.study", "--output-dir", str(tmp_path / "s"), *grid, *RUN],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "s").exists()  # nothing written


def test_each_cell_computes_in_its_own_precision_on_the_one_device(tmp_path):
    first = launch.Launch(Settings.from_command_line([*RUN, "--bf16", "off"]), torch.device("cpu"), "fp32", tmp_path)
    other = launch.more_on_this_device(first, Settings.from_command_line([*RUN, "--bf16", "on", "--output-dir", "b"]))
    assert (other.precision, other.device, other.output_dir.name) == ("bf16-autocast", first.device, "b")
    with pytest.raises(UserError, match="the runs of one process share its device"):
        launch.more_on_this_device(first, Settings.from_command_line([*RUN, "--device", "auto"]))


def test_cells_trained_at_once_write_each_seed_once_with_its_own_arms(whole_study, tmp_path, capsys):
    # Both cells train seeds 1, 2 and 3: a seed's arms must never meet another cell's.
    assert run_study("--output-dir", tmp_path, *GRID, *RUN, "--concurrent-arms", 8) == 0
    out = capsys.readouterr().out
    written = re.findall(r"^(\S+): seed (\d): wrote (\S+)", out, re.M)
    seeds = [(cell, str(seed)) for cell in CELLS for seed in (1, 2, 3)]
    assert sorted(written) == sorted((c, s, f"{tmp_path / c}/results_seed_{s}.json") for c, s in seeds)
    # A seed's lines name its cell: each cell reports each seed's two arms once.
    finals = re.findall(r"^(\S+): seed (\d) (baseline|phase_aware) +best .* final ", out, re.M)
    assert sorted(finals) == sorted((cell, seed, arm) for cell, seed in seeds for arm in ("baseline", "phase_aware"))
    for cell in CELLS:
        assert results_files(tmp_path / cell) == results_files(whole_study / cell)
