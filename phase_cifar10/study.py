"""A study: one run per cell of a grid of settings, every cell's seeds and arms trained in this one
process (all at once on a GPU, one after another on a CPU), then each cell's summary and the
study's table and figure.

    python -m phase_cifar10.study --output-dir results/study-base-lr --vary base_lr=0.005,0.01,0.02 \\
        --data-dir DIR --seeds 42,137,2024,7,314 --val-size 5000

Every flag but --vary and --output-dir is the run's (phase_controller.py's), the same in every
cell. --vary NAME=V1,V2,... (repeatable) gives one setting's values; the cells are every
combination. Each cell is a folder under --output-dir named for its values (base_lr=0.02), with
what a multi-seed run writes there; the study adds study.json, study.md (its table) and study.png.
--resume continues a study that was cut off; --restart trains it afresh.
"""

import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import launch
from .evidence import brief, comparison_cell, load_seed_results, paired_stats, table_head, table_row
from .figures import plot_study
from .files import UserError, write_atomically, write_json
from .records import ARMS, BASELINE, DETECTED_PHASES, PHASE_AWARE, arm_problem, summary_path
from .settings import OneLineParser, Settings, flag

PROG = "python -m phase_cifar10.study"


def main(argv=None):
    parser = OneLineParser(prog=PROG, usage=f"{PROG} --output-dir DIR --vary NAME=V1,V2,... [run flags]")
    parser.add_argument("--output-dir", required=True, help="the study's folder: one folder per cell inside")
    parser.add_argument("--vary", action="append", required=True, metavar="NAME=V1,V2,...", help="a setting's values")
    try:
        ours, run_flags = parser.parse_known_args(argv)
        if os.environ.get("WORLD_SIZE", "1") != "1":
            raise UserError("a study runs in one process, its arms at once on one device: start it without torchrun")
        cells = study_cells(Path(ours.output_dir), ours.vary, run_flags)
        code = launch.run_training(*cells.values())  # each cell's folder is made inside the study's
        table = write_study(Path(ours.output_dir), cells)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command with --resume to continue the study", file=sys.stderr)
        return 130
    print(table)
    return code


def study_cells(folder, vary, run_flags):
    """{cell name: its Settings}: every combination of the --vary values, each run into its own folder."""
    axes = []
    for text in vary:
        name, _, values = text.partition("=")
        name = name.strip().removeprefix("--").replace("-", "_")
        if not values or name in dict(axes):
            raise UserError(f"--vary {text}: give NAME=V1,V2,... once per setting")
        axes.append((name, [v.strip() for v in values.split(",")]))
    cells = {}
    for combination in itertools.product(*(values for _, values in axes)):
        chosen = list(zip((name for name, _ in axes), combination, strict=True))
        cell = ",".join(f"{name}={value}" for name, value in chosen)
        flags = [part for name, value in chosen for part in (flag(name), value)]
        try:
            settings = Settings.from_command_line(
                [*run_flags, *flags, "--multi-seed", "--output-dir", str(folder / cell)]
            )
        except UserError as e:
            raise UserError(f"cell {cell}: {e}") from None
        cells[cell] = settings
    return cells


def write_study(folder, cells):
    """study.json, study.md and study.png from the cells' summaries and results; returns the table."""
    rows = [study_row(cell, json.loads(summary_path(settings.output_dir, ".json").read_text()))
            for cell, settings in cells.items()]  # fmt: skip
    best = best_cells({cell: load_seed_results(settings.output_dir) for cell, settings in cells.items()})
    write_json(folder / "study.json", {"cells": rows, "best": best})
    table = study_table(rows, best)
    write_atomically(folder / "study.md", table.encode())
    varied = [part.partition("=")[0] for part in next(iter(cells)).split(",")]
    plot_study(rows, folder / "study.png", f"final test accuracy by {', '.join(varied)}")
    return table


def study_row(cell, summary):
    """What the study reports of one cell: each arm's final accuracies, the phase arm's paired
    comparisons, and the epochs (1-based) after which each phase was detected, seed by seed."""
    arms = {name: summary["arms"][name]["final_acc"] for name in ARMS if name in summary["arms"]}
    comparisons = {}
    for other in [arm for arm in ARMS if arm != PHASE_AWARE]:
        compared = summary["comparisons"].get(f"{PHASE_AWARE}_vs_{other}")
        if compared:
            comparisons[other] = brief(compared["final_acc"], compared["pairs"])
    transitions = {seed: {phase: epoch + 1 for phase, epoch in found.items()}
                   for seed, found in summary["transitions"].items()}  # fmt: skip
    return {"cell": cell, "seeds": summary["seeds"], "final_acc": arms, "comparisons": comparisons,
            "detected_after_epoch": transitions}  # fmt: skip


def best_cells(results):
    """Each arm at its best cell, and the phase arm's best against the baseline's best: does the
    controller beat a tuned baseline? results: {cell: {seed: results}}.

    An arm's best cell has the highest validation accuracy after the last epoch, averaged over the
    seeds; the held-out split chooses, never the test split, which would flatter both arms. A cell
    where the arm diverged on any seed is not a candidate. The comparison pairs each seed's final
    test accuracy in the two chosen cells. None with fewer than two cells or without --val-size.
    """
    validated = all("val_acc" in r[BASELINE]["per_epoch"] for by_seed in results.values() for r in by_seed.values())
    if len(results) < 2 or not validated:  # a study may vary --val-size: every cell needs one
        return None
    best = {}
    for arm in (BASELINE, PHASE_AWARE):
        means = {cell: float(np.mean([r[arm]["per_epoch"]["val_acc"][-1] for r in by_seed.values()]))
                 for cell, by_seed in results.items()
                 if not any(arm_problem(r[arm]) for r in by_seed.values())}  # fmt: skip
        if not means:
            return None
        cell = max(means, key=means.get)  # the first of equals
        best[arm] = {"cell": cell, "val_acc": means[cell]}
    ours, theirs = results[best[PHASE_AWARE]["cell"]], results[best[BASELINE]["cell"]]
    deltas = {seed: ours[seed][PHASE_AWARE]["final_acc"] - theirs[seed][BASELINE]["final_acc"]
              for seed in ours if seed in theirs}  # fmt: skip
    return best | {"final_acc": paired_stats(deltas)}


def study_table(rows, best=None):
    """The study's table in Markdown: a row per cell, then each arm at its best cell."""
    arms = [arm for arm in ARMS if any(arm in row["final_acc"] for row in rows)]  # the arms the cells trained
    compared = [arm for arm in arms if arm != PHASE_AWARE]
    head = ["cell", "seeds", *(f"{arm} final" for arm in arms)]
    head += [f"Δ vs {other} (95% CI), p, pairs" for other in compared]
    lines = table_head(head + [f"{phase} after epoch" for phase in DETECTED_PHASES])
    for row in rows:
        cells = [row["cell"], str(len(row["seeds"]))]
        cells += [f"{row['final_acc'][arm]['mean']:.2f}" if arm in row["final_acc"] else "" for arm in arms]
        cells += [comparison_cell(row["comparisons"].get(other)) for other in compared]
        for phase in DETECTED_PHASES:
            epochs = [found.get(phase) for found in row["detected_after_epoch"].values()]
            cells.append(" ".join("never" if e is None else str(e) for e in epochs))
        lines.append(table_row(cells))
    note = (
        "\nFinal test accuracy (%), the mean over seeds; Δ in points, phase-aware minus the other arm, with "
        "its 95% bootstrap interval and sign-flip p (none below 3 pairs); detections seed by seed.\n"
    )
    if best:
        tuned = brief(best["final_acc"], best["final_acc"]["total"])
        note += (
            f"\nEach arm at its best cell, chosen on mean validation accuracy after the last epoch: baseline at "
            f"{best[BASELINE]['cell']} ({best[BASELINE]['val_acc']:.2f}), phase_aware at {best[PHASE_AWARE]['cell']} "
            f"({best[PHASE_AWARE]['val_acc']:.2f}); phase-aware minus baseline in final test accuracy "
            f"{comparison_cell(tuned)} pairs.\n"
        )
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    sys.exit(main())
