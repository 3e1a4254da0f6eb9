"""The published results: each summary, and the README's table, are what the per-seed files say."""

import json
import re

import pytest
from helpers import ROOT, read_json

from phase_cifar10 import evidence, files

REFERENCE = ROOT / "results" / "reference-cpu"
SEEDS = sorted(int(p.stem.removeprefix("results_seed_")) for p in REFERENCE.glob("results_seed_*.json"))


def test_the_reference_holds_seeds():
    assert SEEDS, f"no results_seed_N.json in {REFERENCE}"


# Every published folder with a summary: the CPU reference, and the default runs once they land.
PUBLISHED = sorted(p.parent for p in (ROOT / "results").glob("*/multi_seed_summary.json"))


def test_the_cpu_reference_is_among_the_published_folders():
    assert REFERENCE in PUBLISHED


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_committed_summary_is_what_summarize_builds_from_the_committed_seeds(folder):
    built = evidence.build_summary(evidence.load_seed_results(folder))
    assert json.loads(json.dumps(built)) == read_json(folder / "multi_seed_summary.json")
    seeds = sorted(int(p.stem.removeprefix("results_seed_")) for p in folder.glob("results_seed_*.json"))
    assert built["seeds"] == seeds


def readme_rows():
    """{seed: cells} of the main README's CPU reference table."""
    text = (ROOT / "README.md").read_text().split("### CPU reference", 1)[1].split("\n### ", 1)[0]
    rows = [line.strip("|").split("|") for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    return {int(cells[0]): [c.strip() for c in cells[1:]] for cells in rows}


@pytest.mark.parametrize("seed", SEEDS)
def test_readme_table_matches_the_seed_file(seed):
    results = read_json(REFERENCE / f"results_seed_{seed}.json")
    arms = [results[arm][metric] for arm in ("baseline", "phase_aware", "control") for metric in files.METRICS]
    deltas = [results[f"delta_{m}{s}"] for s in ("", "_vs_control") for m in files.METRICS]
    cells = readme_rows()[seed]
    assert cells[:6] == [number(v) for v in arms]
    assert cells[6:10] == [number(v, "+") for v in deltas]
    transitions = results["phase_aware"]["transition_epochs"]
    assert cells[10] == (", ".join(f"{k} {v}" for k, v in transitions.items()) or "none")
    control, mean = results["control"]["fixed_lr_mult"], results["phase_aware"]["mean_lr_mult"]
    assert cells[11] == ("n/a" if control is None else f"{control:.4f}") + f" ({mean:.4f})"


def number(value, sign=""):
    return "n/a" if value is None else f"{value:{sign}.2f}"
