"""The published results: each summary, and the README's table, are what the per-seed files say."""

import json
import re

import pytest
from helpers import ROOT, read_json, row_cells, table_lines

from phase_cifar10 import evidence, study, training
from phase_controller import PhaseController

REFERENCE = ROOT / "results" / "reference-cpu"
DEFAULT = ROOT / "results" / "default-cpu"  # the default reproduction, seed by seed


def seeds_in(folder):
    return sorted(int(p.stem.removeprefix("results_seed_")) for p in folder.glob("results_seed_*.json"))


SEEDS = seeds_in(REFERENCE)
DEFAULT_SEEDS = seeds_in(DEFAULT)


def test_the_reference_holds_seeds():
    assert SEEDS, f"no results_seed_N.json in {REFERENCE}"


# Every published folder with a summary: the CPU reference, the default runs once they land, and
# each cell of a published study (a folder of its own inside the study's).
PUBLISHED = sorted(p.parent for p in (ROOT / "results").glob("**/multi_seed_summary.json"))
STUDIES = sorted(p.parent for p in (ROOT / "results").glob("*/study.json"))


def test_the_cpu_reference_is_among_the_published_folders():
    assert REFERENCE in PUBLISHED


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_committed_summary_is_what_summarize_builds_from_the_committed_seeds(folder):
    built = evidence.build_summary(evidence.load_seed_results(folder))
    assert json.loads(json.dumps(built)) == read_json(folder / "multi_seed_summary.json")
    assert built["seeds"] == seeds_in(folder)


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_a_published_summarys_table_is_what_its_seed_files_say(folder):
    table = folder / "multi_seed_summary.md"
    assert table.read_text() == evidence.summary_table(read_json(folder / "multi_seed_summary.json"))
    rows = table_rows(table, "| seed |")
    assert sorted(rows) == sorted([str(seed) for seed in seeds_in(folder)] + ["mean"])
    for seed in seeds_in(folder):
        results = read_json(folder / f"results_seed_{seed}.json")
        arms = [arm for arm in ("baseline", "phase_aware", "control", "borrowed") if arm in results]
        expected = [f"{results[arm]['final_acc']:.2f}" for arm in arms]  # every published arm finished
        expected += [f"{results['delta_final_acc' + ('' if arm == 'baseline' else '_vs_' + arm)]:+.2f}"
                     for arm in arms if arm != "phase_aware"]  # fmt: skip
        entered = results["phase_aware"]["transition_epochs"]
        expected += [str(entered[phase] + 1) if phase in entered else "never" for phase in ("S1", "S2", "S3")]
        assert rows[str(seed)] == expected


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: p.name)
def test_a_published_studys_table_is_what_its_cells_summaries_say(folder):
    published = read_json(folder / "study.json")
    cells = published["cells"]
    rows = [
        study.study_row(cell["cell"], read_json(folder / cell["cell"] / "multi_seed_summary.json")) for cell in cells
    ]
    assert json.loads(json.dumps(rows)) == cells
    best = study.best_cells({cell["cell"]: evidence.load_seed_results(folder / cell["cell"]) for cell in cells})
    assert json.loads(json.dumps(best)) == published["best"]
    assert (folder / "study.md").read_text() == study.study_table(rows, best)
    assert {cell["cell"] for cell in cells} == {p.name for p in folder.iterdir() if p.is_dir()}


def controlled(path):
    """Whether the seed's control ran, from a phase arm that recorded its optimizer steps per epoch
    (the reference predates that record; its accumulation stayed 1)."""
    results = read_json(path)
    return results.get("control", {}).get("status") == "ok" and "steps" in results["phase_aware"]["per_epoch"]


# Every such seed: its control's constant was computed by one machine's Python, and any other
# Python must compute the same from the phase arm's record, or a rerun there (or --resume)
# trains a different control.
CONTROLLED = sorted(p for p in (ROOT / "results").glob("**/results_seed_*.json") if controlled(p))


def test_the_default_seed_on_the_cpu_has_a_control():
    assert DEFAULT / f"results_seed_{DEFAULT_SEEDS[0]}.json" in CONTROLLED


@pytest.mark.parametrize("path", CONTROLLED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_a_published_controls_multiplier_is_the_one_every_python_computes_from_its_phase_arm(path):
    results = read_json(path)
    assert training.matched_lr_mult(results["phase_aware"], results["config"]) == results["control"]["fixed_lr_mult"]


def section_table(path, heading):
    """The table lines of the section of a Markdown file under heading."""
    return table_lines(path.read_text().split(heading, 1)[1].split("\n## ", 1)[0])


def table_rows(path, heading):
    """{seed or "mean": cells} of the table in the section of a Markdown file under heading."""
    rows = [row_cells(line) for line in section_table(path, heading) if re.match(r"\| (\d+|\*\*mean\*\*) \|", line)]
    return {cells[0].strip("*"): cells[1:] for cells in rows}


def accuracy_cells(results):
    """The final accuracies of the three arms and the phase arm's two deltas, as a table prints them."""
    finals = [f"{results[arm]['final_acc']:.2f}" for arm in ("baseline", "phase_aware", "control")]
    return finals + [f"{results[f'delta_final_acc{s}']:+.2f}" for s in ("", "_vs_control")]


def readme_table(heading):
    """The table lines of the README's section under heading."""
    return section_table(ROOT / "README.md", heading)


def test_readme_reference_table_is_its_summarys_table():  # which a test above checks against the seed files
    table = readme_table("## Result: the CPU reference")
    assert table and table == table_lines((REFERENCE / "multi_seed_summary.md").read_text())


# ----- the default reproduction, seed by seed -----


def default_rows():
    """{seed: cells} of the results table in results/default-cpu/README.md."""
    return {int(k): cells for k, cells in table_rows(DEFAULT / "README.md", "## Seed 42").items() if k != "mean"}


def test_every_default_seed_has_a_row_and_every_row_a_seed():
    assert sorted(default_rows()) == DEFAULT_SEEDS


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_default_table_matches_the_seed_file(seed):
    results = read_json(DEFAULT / f"results_seed_{seed}.json")
    assert results["config"]["precision"] == "bf16-autocast"  # every default seed runs in bf16
    cells = default_rows()[seed]
    assert cells[:5] == accuracy_cells(results)
    transitions = results["phase_aware"]["transition_epochs"]
    assert cells[5:7] == [f"after epoch {transitions[s] + 1}" if s in transitions else "never" for s in ("S1", "S2")]


def test_readme_timing_table_is_the_published_studys():
    table = readme_table("## Result: a control for the timing")
    assert table and table == table_lines((ROOT / "results" / "timing-cpu" / "study.md").read_text())


# ----- the tuned-baseline study at the reference's scale -----

TUNED = ROOT / "results" / "tuned-baseline-cpu"
AT_REFERENCE_LR = TUNED / "base_lr=0.01"  # the reference's setting, without its control


def test_the_tuned_study_holds_the_reference_lr():
    assert seeds_in(AT_REFERENCE_LR)


def test_readme_tuned_baseline_table_is_the_published_studys():
    table = readme_table("## Result: a tuned baseline")
    assert table and table == table_lines((TUNED / "study.md").read_text())


@pytest.mark.parametrize("seed", seeds_in(AT_REFERENCE_LR))
def test_the_tuned_studys_cell_at_the_reference_lr_reproduces_the_reference(seed):
    # Other code, another CPU generation, another run: every logged number but the times the same.
    cell, reference = (read_json(folder / f"results_seed_{seed}.json") for folder in (AT_REFERENCE_LR, REFERENCE))
    assert cell["config"]["base_lr"] == reference["config"]["base_lr"] == 0.01
    for arm in ("baseline", "phase_aware"):
        ours, theirs = logged_epochs(cell[arm], reference[arm])
        assert ours == theirs
        assert cell[arm]["final_acc"] == reference[arm]["final_acc"]


def logged_epochs(*records):
    """Each arm record's logged numbers epoch by epoch, of the keys every one logs, times aside
    (the reference predates the "steps" record)."""
    keys = set.intersection(*(set(record["per_epoch"]) for record in records))
    keys = sorted(key for key in keys if not key.endswith("_seconds"))
    assert {"train_loss", "eval_loss", "eval_acc", "val_acc", "lr"} <= set(keys)
    return [[dict(zip(keys, epoch, strict=True)) for epoch in zip(*(r["per_epoch"][k] for k in keys), strict=True)]
            for r in records]  # fmt: skip


# ----- thresholds where S2 acts, at the reference's scale -----

THRESHOLDS = ROOT / "results" / "thresholds-cpu"
THRESHOLD_SEEDS = sorted(THRESHOLDS.glob("*/results_seed_*.json"))


def test_readme_thresholds_table_is_the_published_studys():
    table = readme_table("## Result: thresholds where S2 acts")
    assert table and table == table_lines((THRESHOLDS / "study.md").read_text())


@pytest.mark.parametrize("path", THRESHOLD_SEEDS, ids=lambda p: str(p.relative_to(THRESHOLDS)))
def test_a_threshold_cell_is_the_reference_until_s2_applies(path):
    # The reference ran in absolute mode at --s2-threshold 0.005; a relative δL crosses the same
    # S1 threshold after the same epoch here. So the baseline, which no controller touches, is the
    # reference's everywhere, and the phase arm is the reference's up to the epoch after which S2
    # was detected, then departs from it as S2's multiplier and accumulation apply.
    cell = read_json(path)
    reference = read_json(REFERENCE / path.name)
    assert cell["config"]["dl_mode"] == "relative"
    assert reference["config"].get("dl_mode", "absolute") == "absolute"  # older seeds predate the setting
    ours, theirs = logged_epochs(cell["baseline"], reference["baseline"])
    assert ours == theirs
    ours, theirs = logged_epochs(cell["phase_aware"], reference["phase_aware"])
    s2 = cell["phase_aware"]["transition_epochs"]["S2"]  # S2 fires in every seed of these cells
    expected = relative(theirs[: s2 + 1])
    expected[s2]["phase"] = "S2_AXIS_LOCK"  # the phase it ended in, having trained in S1 like the reference's
    assert ours[: s2 + 1] == expected
    assert ours[s2 + 1]["train_loss"] != theirs[s2 + 1]["train_loss"]


def relative(epochs):
    """Logged epochs with δL as dl_mode "relative" has it: divided by the epoch's training loss."""
    return [epoch | {"dL": epoch["dL"] / epoch["train_loss"]} for epoch in epochs]


HELD_OUT = (1, 2, 3, 4, 5)  # the reference's seeds the thresholds were chosen on, none of them in the study


def test_the_thresholds_were_chosen_where_s2_fires_on_the_held_out_seeds_baselines():
    # The study README's replay table, recomputed with the library alone: the relative S2
    # threshold, then the epoch after which S2 fires over each held-out seed's baseline curve.
    rows = [row_cells(line) for line in section_table(THRESHOLDS / "README.md", "## Why these thresholds")[2:]]
    assert {row[0] for row in rows} >= {"0.04", "0.05"}  # the study's two cells among them
    assert THRESHOLD_SEEDS and not {read_json(path)["config"]["seed"] for path in THRESHOLD_SEEDS} & set(HELD_OUT)
    for threshold, epochs in rows:
        fired = []
        for seed in HELD_OUT:
            controller = PhaseController(s2_threshold=float(threshold), dl_mode="relative")
            for loss in read_json(REFERENCE / f"results_seed_{seed}.json")["baseline"]["per_epoch"]["train_loss"]:
                controller.observe(loss)
            entered = controller.transition_epochs
            fired.append(str(entered["S2"] + 1) if "S2" in entered else "never")
        assert epochs == ", ".join(fired), threshold
