"""The evidence: paired statistics over seeds, the multi-seed summary, and the success criteria."""

import math
from pathlib import Path

import numpy as np

from phase_controller import S1_BOUNDARY, S2_AXIS_LOCK

from .figures import plot_summary
from .files import UserError, write_atomically, write_json
from .progress import seed_name
from .records import (
    ARMS,
    BASELINE,
    BORROWED,
    CONTROL,
    DETECTED_PHASES,
    METRICS,
    PHASE_AWARE,
    arm_problem,
    delta_key,
    paired_delta,
    read_results_file,
    results_path,
    seeds_with_results,
    summary_path,
    transition_epoch,
)
from .settings import RECORDED_SINCE, identity

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
EXACT_SIGN_FLIP_MAX_N = 16  # 2^16 sign patterns; beyond that a fixed-seed Monte Carlo sample
# Below this many pairs an interval or a p-value says nothing: two seeds cannot give p below 0.5.
MIN_PAIRS = 3


def bootstrap_ci(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[idx].mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]


def sign_flip_p_value(deltas):
    """Two-sided paired sign-flip permutation p-value of the mean delta.

    Under the null the sign of each seed's delta is a coin flip: p is the share of sign patterns
    whose |mean| is at least the observed |mean|. Exact (all 2^n patterns) for n <= 16.
    """
    d = np.asarray(deltas, dtype=float)
    n = len(d)
    exact = n <= EXACT_SIGN_FLIP_MAX_N
    if exact:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    else:
        bits = np.random.default_rng(BOOTSTRAP_SEED).integers(0, 2, size=(100_000, n))
    extreme = np.sum(np.abs(((1 - 2 * bits) * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    # A sampled p-value counts the observed pattern too, so that it is never 0.
    return float(extreme / len(bits)) if exact else float((extreme + 1) / (len(bits) + 1))


def paired_stats(deltas):
    """Statistics of per-seed deltas {seed: delta} (only seeds whose two arms both finished); no
    interval and no p-value below MIN_PAIRS pairs."""
    d = np.asarray(list(deltas.values()), dtype=float)
    enough = len(d) >= MIN_PAIRS
    return {
        "per_seed": {str(seed): float(v) for seed, v in deltas.items()},
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "std": float(d.std(ddof=1)) if len(d) > 1 else None,
        "ci95": bootstrap_ci(d) if enough else None,
        "p_value": sign_flip_p_value(d) if enough else None,
        "positive": int((d > 0).sum()),
        "total": len(d),
    }


def arm_statistics(results, name, metric):
    """Mean and std of one arm's metric over the seeds where that arm finished healthy."""
    per_seed = {str(s): r[name][metric] if r[name]["status"] == "ok" else None for s, r in results.items()}
    present = [v for v in per_seed.values() if v is not None]
    return {
        "mean": float(np.mean(present)) if present else None,
        "std": float(np.std(present, ddof=1)) if len(present) > 1 else None,
        "seeds": len(present),
        "per_seed": per_seed,
    }


def compare(results, other):
    """Paired phase_aware-minus-other statistics over the seeds where both arms finished healthy."""
    excluded = []
    for seed, r in results.items():
        problems = [f"{name} {arm_problem(r[name])}" for name in (PHASE_AWARE, other) if arm_problem(r[name])]
        if problems:
            excluded.append({"seed": seed, "reason": "; ".join(problems)})
    skip = {e["seed"] for e in excluded}
    comparison = {"pairs": len(results) - len(skip), "excluded": excluded}
    for metric in METRICS:
        deltas = {s: paired_delta(r, other, metric) for s, r in results.items() if s not in skip}
        comparison[metric] = paired_stats(deltas) if deltas else None
    return comparison


def seed_results(config, records):
    """A seed's results file: its config, every arm's record, and the phase arm's deltas."""
    results = {"config": config, **records}
    for other in [name for name in records if name != PHASE_AWARE]:
        for metric in METRICS:
            results[delta_key(metric, other)] = paired_delta(results, other, metric)
    return results


def load_seed_results(folder, seeds=None):
    """{seed: results} from results_seed_N.json files, refusing any whose run settings or data
    disagree. The settings that older files lack (RECORDED_SINCE: the data's fingerprint, the
    threads) are compared among the files that hold them; the others are named, as not checked."""
    folder = Path(folder)
    if seeds is None:
        seeds = seeds_with_results(folder)
        if not seeds:
            raise UserError(f"no {results_path(folder, 'N').name} files in {folder}")
    results, first, unrecorded = {}, {}, []  # first: each setting's (file, value) in the first file holding it
    for seed in sorted(seeds):
        path = results_path(folder, seed)
        results[seed] = read_results_file(path, seed)
        settings, differing, others = identity(results[seed]["config"]), [], {}
        for key, value in settings.items():
            there, expected = first.setdefault(key, (path.name, value))
            if value != expected:
                differing.append(f"{key} {expected!r} in {there}, {value!r} in {path.name}")
                others[there] = None  # an ordered set
        if differing:
            raise UserError(f"{' and '.join([path.name, *others])} were run with different settings or data: "
                            f"{'; '.join(differing)}")  # fmt: skip
        if not set(RECORDED_SINCE) <= settings.keys():
            unrecorded.append(path.name)
    if unrecorded and len(unrecorded) < len(results):
        print(f"not checked: {', '.join(unrecorded)} predate the record of {' and '.join(RECORDED_SINCE)}")
    return results


def write_summary(folder, seeds=None):
    """multi_seed_summary.json, .md (its table) and .png from the folder's results files, and the
    summary printed."""
    results = load_seed_results(folder, seeds)
    summary = build_summary(results)
    plot_summary(results, summary, summary_path(folder, ".png"))
    write_json(summary_path(folder, ".json"), summary)
    write_atomically(summary_path(folder, ".md"), summary_table(summary).encode())
    print_summary(summary)
    print(f"wrote {summary_path(folder, '.json')}, {summary_path(folder, '.md').name} and "
          f"{summary_path(folder, '.png').name}")  # fmt: skip
    return summary


def summary_table(summary):
    """The summary's table in Markdown: a row per seed (each arm's final test accuracy, the phase
    arm's deltas, the epochs after which each phase was detected), then the mean row with each
    comparison's interval, p and pairs. What a README shows of a published folder."""
    arms = list(summary["arms"])
    others = [arm for arm in arms if arm != PHASE_AWARE]
    comparisons = [summary["comparisons"][f"{PHASE_AWARE}_vs_{other}"]["final_acc"] or {} for other in others]
    head = ["seed", *(f"{arm} final" for arm in arms), *(f"Δ vs {other}" for other in others)]
    lines = table_head(head + [f"{phase} after epoch" for phase in DETECTED_PHASES])
    for seed in map(str, summary["seeds"]):
        cells = [seed]
        for arm in arms:
            final = summary["arms"][arm]["final_acc"]["per_seed"][seed]
            cells.append(summary["arms"][arm]["status"][seed] if final is None else f"{final:.2f}")
        deltas = [stats.get("per_seed", {}).get(seed) for stats in comparisons]
        cells += ["" if delta is None else f"{delta:+.2f}" for delta in deltas]
        found = summary["transitions"][seed]
        cells += [str(found[phase] + 1) if phase in found else "never" for phase in DETECTED_PHASES]
        lines.append(table_row(cells))
    means = [summary["arms"][arm]["final_acc"]["mean"] for arm in arms]
    cells = ["**mean**"] + ["" if mean is None else f"{mean:.2f}" for mean in means]
    cells += [comparison_cell(brief(stats, stats["total"]) if stats else None) for stats in comparisons]
    seeds = len(summary["seeds"])
    cells += [f"{sum(phase in found for found in summary['transitions'].values())} of {seeds}"
              for phase in DETECTED_PHASES]  # fmt: skip
    lines.append(table_row(cells))
    note = (
        "\nFinal test accuracy (%); Δ in points, phase-aware minus the other arm, and in the mean row with its 95% "
        "bootstrap interval, sign-flip p and pairs (none below 3 pairs); a phase's column gives the epoch, counting "
        "from 1, after which the controller detected it, and in the mean row on how many seeds.\n"
    )
    return "\n".join(lines) + "\n" + note


def table_head(names):
    """A Markdown table's first two lines."""
    return [table_row(names), "|" + "---|" * len(names)]


def table_row(cells):
    return "| " + " | ".join(cells) + " |"


def brief(stats, pairs):
    """What the table shows of a paired comparison (paired_stats): mean, interval, p and pairs."""
    return {k: stats.get(k) for k in ("mean", "ci95", "p_value")} | {"pairs": pairs}


def comparison_cell(compared):
    if not compared:
        return ""
    text = f"{compared['mean']:+.2f}"
    if compared["ci95"] is not None:
        text += f" ({compared['ci95'][0]:+.2f}..{compared['ci95'][1]:+.2f}), p {compared['p_value']:.3f}"
    return f"{text}, {compared['pairs']}"


def build_summary(results):
    seeds = sorted(results)
    results = {s: results[s] for s in seeds}
    arms = [a for a in ARMS if a in results[seeds[0]]]
    held = [identity(results[s]["config"]) for s in seeds]  # older files lack the RECORDED_SINCE settings
    config = {key: value for key, value in held[0].items() if all(key in settings for settings in held)}
    summary = {"seeds": seeds, "config": config, "arms": {}, "comparisons": {}}
    for name in arms:
        summary["arms"][name] = {metric: arm_statistics(results, name, metric) for metric in METRICS}
        summary["arms"][name]["status"] = {str(s): results[s][name]["status"] for s in seeds}
    for other in [name for name in arms if name != PHASE_AWARE]:
        summary["comparisons"][f"phase_aware_vs_{other}"] = compare(results, other)
    summary["transitions"] = {str(s): results[s][PHASE_AWARE].get("transition_epochs", {}) for s in seeds}
    summary["success_criteria"] = success_criteria(results, summary["comparisons"]["phase_aware_vs_baseline"])
    return summary


# What a successful reproduction shows, as the original project states it: a positive mean delta
# over the baseline, a majority of seeds positive, visible S1 -> S2 transitions in the phase arm,
# and a phase-aware LR that departs from the baseline's only after a detection. The deltas are
# judged on the final accuracy: it involves no selection, and with --val-size it is a clean
# held-out number for every arm.
CRITERIA_METRIC = "final_acc"


def s2_visible(phase_record):
    """S2 was entered early enough that its multipliers were applied in at least one epoch
    (epoch e applies what the phase after epoch e-1 recommends)."""
    phases = phase_record["per_epoch"]["phase"]
    applied = sum(phase == S2_AXIS_LOCK for phase in phases[:-1])
    return {"met": applied > 0, "s2_entered_at": transition_epoch(phase_record, S2_AXIS_LOCK),
            "epochs_at_s2_multipliers": applied}  # fmt: skip


def lr_departs_after_detection(results):
    """The phase arm's recorded LR equals the baseline's until the epoch after the first detection."""
    base, phase = results[BASELINE]["per_epoch"]["lr"], results[PHASE_AWARE]["per_epoch"]["lr"]
    both = zip(base, phase, strict=False)  # a diverged arm's log is shorter
    departed = [e for e, (a, b) in enumerate(both) if not math.isclose(a, b, rel_tol=1e-12)]
    first_departure = departed[0] if departed else None
    detected = transition_epoch(results[PHASE_AWARE], S1_BOUNDARY)
    met = first_departure is None or (detected is not None and first_departure > detected)
    return {"met": met, "first_departure_epoch": first_departure, "first_detection_epoch": detected}


def seed_criteria(results):
    """The criteria that one seed can show on its own."""
    delta = paired_delta(results, BASELINE, CRITERIA_METRIC)
    return {
        "positive_delta": {"met": delta is not None and delta > 0, "metric": CRITERIA_METRIC, "delta": delta},
        "s1_to_s2_visible": s2_visible(results[PHASE_AWARE]),
        "lr_departs_only_after_detection": lr_departs_after_detection(results),
    }


def success_criteria(results, vs_baseline):
    """The four criteria over all seeds; the deltas over healthy pairs only."""
    stats = vs_baseline[CRITERIA_METRIC]
    pairs, mean = (stats["total"], stats["mean"]) if stats else (0, None)
    positive = stats["positive"] if stats else 0
    return {
        "positive_mean_delta": {"met": mean is not None and mean > 0, "metric": CRITERIA_METRIC,
                                "mean_delta": mean, "pairs": pairs},
        "majority_of_seeds_positive": {"met": positive > pairs / 2 if pairs else False, "positive": positive,
                                       "pairs": pairs},
        "s1_to_s2_visible": in_every_seed(results, lambda r: s2_visible(r[PHASE_AWARE])),
        "lr_departs_only_after_detection": in_every_seed(results, lr_departs_after_detection),
    }  # fmt: skip


def in_every_seed(results, check):
    """A per-seed criterion over all seeds: met when every seed meets it."""
    per_seed = {str(s): check(r) for s, r in results.items()}
    met = [c["met"] for c in per_seed.values()]
    return {"met": all(met), "seeds_met": sum(met), "seeds": len(met), "per_seed": per_seed}


def criterion_detail(name, c):
    """The numbers behind one criterion, in words."""
    if "seeds_met" in c:  # a summary's per-seed criterion
        return f"{c['seeds_met']}/{c['seeds']} seeds"
    if name == "positive_mean_delta":
        return f"mean {c['metric']} delta {fmt_points(c['mean_delta'])} over {c['pairs']} healthy pairs"
    if name == "majority_of_seeds_positive":
        return f"{c['positive']}/{c['pairs']} healthy pairs positive"
    if name == "positive_delta":
        return f"{c['metric']} delta {fmt_points(c['delta'])}"
    if name == "s1_to_s2_visible":
        if c["s2_entered_at"] is None:
            return "S2 never entered"
        applied = c["epochs_at_s2_multipliers"]
        return f"S2 entered after epoch {c['s2_entered_at'] + 1}, its multipliers applied in {applied} epoch(s)"
    departs, detected = c["first_departure_epoch"], c["first_detection_epoch"]
    departure = "LR never departs" if departs is None else f"LR first departs in epoch {departs + 1}"
    return departure + (", S1 never detected" if detected is None else f", S1 detected after epoch {detected + 1}")


def print_criteria(criteria, prefix=""):
    for name, c in criteria.items():
        verdict = "met" if c["met"] else "NOT met"
        print(f"{prefix}criterion [{verdict:>7}] {name.replace('_', ' ')}: {criterion_detail(name, c)}")


def print_seed_result(results, run=""):
    """A finished seed's lines: each arm's accuracies, the deltas, the transitions, the criteria; run
    begins each line where several runs train together."""
    who = seed_name(results["config"]["seed"], run)
    for name in ARMS:
        if name in results:
            record = results[name]
            status = "" if record["status"] == "ok" else f"  [{arm_problem(record)}]"
            best, final = fmt_acc(record["best_acc"]), fmt_acc(record["final_acc"])
            print(f"{who} {name:<11} best {best}  final {final}{status}")
    if CONTROL in results and results[CONTROL]["status"] == "ok":
        print(
            f"{who} control lr_mult {results[CONTROL]['fixed_lr_mult']:.4f} (matched on the total update;"
            f" the phase arm's plain mean multiplier is {results[PHASE_AWARE]['mean_lr_mult']:.4f})"
        )
    if BORROWED in results:
        borrowed = results[BORROWED]
        timing = ", ".join(
            f"{key} after epoch {epoch + 1}" for key, epoch in borrowed.get("transition_epochs", {}).items()
        )
        print(f"{who} borrowed follows seed {borrowed['borrowed_from']}'s timing ({timing or 'no phase entered'})")
    for other in [name for name in ARMS if name != PHASE_AWARE and name in results]:
        best, final = (results[delta_key(metric, other)] for metric in METRICS)
        print(f"{who} delta (phase_aware - {other}): best {fmt_points(best)}  final {fmt_points(final)}")
    for line in results[PHASE_AWARE].get("transitions", []):
        print(f"{who} transition {line}")
    print_criteria(seed_criteria(results), prefix=f"{who} ")


def print_summary(summary):
    print(f"\nsummary over seeds {summary['seeds']}")
    for name, stats in summary["arms"].items():
        best, final = stats["best_acc"], stats["final_acc"]
        print(
            f"  {name:<11} best {fmt_acc(best['mean'])} +- {fmt_points(best['std'], '')}"
            f"  final {fmt_acc(final['mean'])} +- {fmt_points(final['std'], '')}  ({best['seeds']} healthy seeds)"
        )
    for name, comparison in summary["comparisons"].items():
        for excluded in comparison["excluded"]:
            print(f"  {name}: seed {excluded['seed']} excluded ({excluded['reason']})")
        for metric in METRICS:
            s = comparison[metric]
            if s is None:
                print(f"  {name} {metric}: no seed with both arms healthy")
                continue
            line = f"  {name} {metric}: mean {fmt_points(s['mean'])}"
            if s["ci95"] is not None:
                line += f" (95% CI {s['ci95'][0]:+.2f}..{s['ci95'][1]:+.2f}), sign-flip p = {s['p_value']:.3f}"
            print(f"{line}, {s['positive']}/{s['total']} healthy pairs positive")
    few = sorted(
        {s["total"] for c in summary["comparisons"].values() for m in METRICS if (s := c[m]) and not s["ci95"]}
    )
    if few:
        print(f"  no interval or p-value: {' or '.join(map(str, few))} pair(s) cannot tell an effect from seed noise"
              f" (two seeds cannot give p below 0.5); run {MIN_PAIRS} seeds or more")  # fmt: skip
    print_criteria(summary["success_criteria"], prefix="  ")


def fmt_acc(value):
    """An accuracy, in percent."""
    return "n/a" if value is None else f"{value:.2f}%"


def fmt_points(value, sign="+"):
    """A difference of accuracies, or their spread, in percentage points."""
    return "n/a" if value is None else f"{value:{sign}.2f} points"
