"""The evidence: paired statistics over seeds, the multi-seed summary, and the success criteria."""

import math
import re
from pathlib import Path

import numpy as np

from phase_controller import S2_AXIS_LOCK

from .files import ARMS, BASELINE, METRICS, PHASE_AWARE, RUN_KEYS, UserError, run_identity
from .records import read_results_file

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
EXACT_SIGN_FLIP_MAX_N = 16  # 2^16 sign patterns; beyond that a fixed-seed Monte Carlo sample


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
    """Statistics of per-seed deltas {seed: delta} (only seeds whose two arms both finished)."""
    d = np.asarray(list(deltas.values()), dtype=float)
    return {
        "per_seed": {str(seed): float(v) for seed, v in deltas.items()},
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "std": float(d.std(ddof=1)) if len(d) > 1 else None,
        "ci95": bootstrap_ci(d),
        "p_value": sign_flip_p_value(d),
        "positive": int((d > 0).sum()),
        "total": len(d),
    }


def arm_problem(arm):
    """Why an arm is no evidence (diverged, or not run), or None when it finished healthy."""
    if arm["status"] == "ok":
        return None
    if arm["status"] == "diverged":
        return f"diverged at epoch {arm['diverged_epoch']}"
    return f"not run: {arm['reason']}"


def arm_statistics(results, arm, metric):
    """Mean and std of one arm's metric over the seeds where that arm finished healthy."""
    per_seed = {str(s): r[arm][metric] if r[arm]["status"] == "ok" else None for s, r in results.items()}
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


def paired_delta(results, other, metric):
    """phase_aware minus other on metric, or None unless both arms finished healthy."""
    a, b = results[PHASE_AWARE], results[other]
    return a[metric] - b[metric] if a["status"] == b["status"] == "ok" else None


def load_seed_results(folder, seeds=None):
    """{seed: results} from results_seed_N.json files, refusing any whose run settings disagree."""
    folder = Path(folder)
    if seeds is None:
        found = (re.fullmatch(r"results_seed_(-?\d+)\.json", p.name) for p in folder.glob("results_seed_*.json"))
        seeds = [int(m.group(1)) for m in found if m]
        if not seeds:
            raise UserError(f"no results_seed_N.json files in {folder}")
    results, reference = {}, None
    for seed in sorted(seeds):
        path = folder / f"results_seed_{seed}.json"
        results[seed] = read_results_file(path, seed)
        identity = run_identity(results[seed]["config"])
        if reference is None:
            reference = (path, identity)
        elif identity != reference[1]:
            diff = ", ".join(
                f"{k}={identity[k]!r} vs {reference[1][k]!r}" for k in RUN_KEYS if identity[k] != reference[1][k]
            )
            raise UserError(f"{path.name} and {reference[0].name} were run with different settings: {diff}")
    return results


def build_summary(results):
    seeds = sorted(results)
    results = {s: results[s] for s in seeds}
    arms = [a for a in ARMS if a in results[seeds[0]]]
    summary = {"seeds": seeds, "config": run_identity(results[seeds[0]]["config"]), "arms": {}, "comparisons": {}}
    for arm in arms:
        summary["arms"][arm] = {metric: arm_statistics(results, arm, metric) for metric in METRICS}
        summary["arms"][arm]["status"] = {str(s): results[s][arm]["status"] for s in seeds}
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


def s2_visible(phase_arm):
    """S2 was entered early enough that its multipliers were applied in at least one epoch
    (epoch e applies what the phase after epoch e-1 recommends)."""
    phases = phase_arm["per_epoch"]["phase"]
    applied = sum(phase == S2_AXIS_LOCK for phase in phases[:-1])
    return {"met": applied > 0, "s2_entered_at": phase_arm.get("transition_epochs", {}).get("S2"),
            "epochs_at_s2_multipliers": applied}  # fmt: skip


def lr_departs_after_detection(results):
    """The phase arm's recorded LR equals the baseline's until the epoch after the first detection."""
    base, phase = results[BASELINE]["per_epoch"]["lr"], results[PHASE_AWARE]["per_epoch"]["lr"]
    both = zip(base, phase, strict=False)  # a diverged arm's log is shorter
    departed = [e for e, (a, b) in enumerate(both) if not math.isclose(a, b, rel_tol=1e-12)]
    first_departure = departed[0] if departed else None
    detected = results[PHASE_AWARE].get("transition_epochs", {}).get("S1")
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
        return f"mean {c['metric']} delta {fmt_acc(c['mean_delta'], '+')} over {c['pairs']} healthy pairs"
    if name == "majority_of_seeds_positive":
        return f"{c['positive']}/{c['pairs']} healthy pairs positive"
    if name == "positive_delta":
        return f"{c['metric']} delta {fmt_acc(c['delta'], '+')}"
    if name == "s1_to_s2_visible":
        if c["s2_entered_at"] is None:
            return "S2 never entered"
        return f"S2 entered at epoch {c['s2_entered_at']}, its multipliers applied in {c['epochs_at_s2_multipliers']}"
    departs, detected = c["first_departure_epoch"], c["first_detection_epoch"]
    departure = "LR never departs" if departs is None else f"LR first departs at epoch {departs}"
    return departure + (", S1 never detected" if detected is None else f", S1 detected at epoch {detected}")


def print_criteria(criteria, prefix=""):
    for name, c in criteria.items():
        verdict = "met" if c["met"] else "NOT met"
        print(f"{prefix}criterion [{verdict:>7}] {name.replace('_', ' ')}: {criterion_detail(name, c)}")


def print_summary(summary):
    print(f"\nsummary over seeds {summary['seeds']}")
    for arm, stats in summary["arms"].items():
        best, final = stats["best_acc"], stats["final_acc"]
        print(
            f"  {arm:<11} best {fmt_acc(best['mean'])} +- {fmt_acc(best['std'])}"
            f"  final {fmt_acc(final['mean'])} +- {fmt_acc(final['std'])}  ({best['seeds']} healthy seeds)"
        )
    for name, comparison in summary["comparisons"].items():
        for excluded in comparison["excluded"]:
            print(f"  {name}: seed {excluded['seed']} excluded ({excluded['reason']})")
        for metric in METRICS:
            s = comparison[metric]
            if s is None:
                print(f"  {name} {metric}: no seed with both arms healthy")
                continue
            print(
                f"  {name} {metric}: mean {s['mean']:+.2f} (95% CI {s['ci95'][0]:+.2f}..{s['ci95'][1]:+.2f}), "
                f"sign-flip p = {s['p_value']:.3f}, {s['positive']}/{s['total']} healthy pairs positive"
            )
    print_criteria(summary["success_criteria"], prefix="  ")


def fmt_acc(value, sign=""):
    return "n/a" if value is None else f"{value:{sign}.2f}%"
