"""Figures: a seed's four panels shaded by the phase in force, the multi-seed summary, and a replay.

Epochs are counted from 1, as people count them. A phase is detected after an epoch (a dotted line
at that epoch) and its multipliers apply from the next one (where its shading starts): the
controller's one-epoch delay is the gap between the two.
"""

import io
import itertools

import numpy as np

from phase_controller import PHASES, S0_EXPLORE, S1_BOUNDARY, S2_AXIS_LOCK, S3_POLISH, dL_of

from .data import data_label
from .files import write_atomically
from .records import ARMS, BASELINE, BORROWED, CONTROL, PHASE_AWARE, paired_delta, transition_key
from .settings import identity

PHASE_COLORS = {S0_EXPLORE: "#e4e4e4", S1_BOUNDARY: "#ffd8a8", S2_AXIS_LOCK: "#a5d8ff", S3_POLISH: "#b2f2bb"}
# Arms that coincide stay apart: the baseline a wide grey band beneath, the control dashed above.
ARM_STYLES = {
    BASELINE: {"color": "0.55", "lw": 3.2, "zorder": 2, "label": "baseline"},
    PHASE_AWARE: {"color": "tab:red", "lw": 1.6, "zorder": 3, "label": "phase-aware"},
    CONTROL: {"color": "tab:blue", "lw": 1.6, "zorder": 4, "ls": (0, (4, 2.5)), "label": "LR-matched control"},
    BORROWED: {"color": "tab:green", "lw": 1.6, "zorder": 5, "ls": (0, (1, 2)), "label": "borrowed timing"},
}
COMPARISONS = {BASELINE: "vs baseline", CONTROL: "vs LR-matched control", BORROWED: "vs borrowed timing"}


def pyplot():
    import matplotlib

    try:
        matplotlib.use("Agg")
    except (ImportError, ValueError):  # a backend that cannot be set now: draw with the one in use
        pass
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    plt, png = pyplot(), io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_atomically(path, png.getvalue())


def epochs_axis(ax, epochs):
    """Epochs 1..epochs on whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0.5, max(epochs, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def phases_in_force(phases):
    """The phase whose multipliers each epoch trained at: the one held after the epoch before."""
    return [S0_EXPLORE, *phases[:-1]] if phases else []


def shade_phases(ax, phases):
    """Background colour by the phase in force in each epoch (1-based): one band per run of
    epochs in the same phase, so a long log costs a few bands, not one per epoch."""
    start = 1
    for phase, span in itertools.groupby(phases_in_force(phases)):
        length = len(list(span))
        ax.axvspan(start - 0.5, start + length - 0.5, color=PHASE_COLORS[phase], lw=0, zorder=0)
        start += length


def mark_detections(ax, transition_epochs):
    """A dotted line at each epoch after which a phase was detected."""
    for index in transition_epochs.values():
        ax.axvline(index + 1, color="k", ls=":", lw=1.1, zorder=1)


def phase_handles(phases, transition_epochs):
    """Legend entries for the phases in force somewhere (only those) and for the detection lines."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    reached = set(phases_in_force(phases))
    handles = [Patch(color=PHASE_COLORS[p], label=f"{p} in force") for p in PHASES if p in reached]
    if transition_epochs:
        detected = ", ".join(f"{key} after epoch {index + 1}" for key, index in transition_epochs.items())
        handles.append(Line2D([], [], color="k", ls=":", label=f"detected ({detected}); in force from the next epoch"))
    return handles


def threshold_bands(ax, s1_threshold, s2_threshold, values):
    """The δL zones the controller acts on, below s1_threshold (S0 -> S1) and |δL| < s2_threshold
    (S1 -> S2), on an axis linear around them and logarithmic beyond, so that both stay visible
    beside the large early slopes."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    low = min([*values, s1_threshold, -s2_threshold])
    high = max([*values, s2_threshold, 0.0])
    linear = 2 * max(abs(s1_threshold), s2_threshold, 1e-12)
    margin = 0.08 * (high - low or 1.0)
    if max(abs(low), abs(high)) > 4 * linear:
        ax.set_yscale("symlog", linthresh=linear, linscale=1)
        margin = linear / 4
        steps = [m * 10.0**k for k in range(-4, 4) for m in (1, 2, 5) if m * 10.0**k >= 2.5 * linear]
        ticks = {0.0, s1_threshold, s2_threshold, *steps, *(-t for t in steps)}
        ax.yaxis.set_major_locator(FixedLocator(sorted(t for t in ticks if low - margin <= t <= high + margin)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.set_ylim(low - margin if low >= -4 * linear else low * 1.15, high + margin)
    s1 = ax.axhspan(ax.get_ylim()[0], s1_threshold, facecolor="none", edgecolor="tab:purple", hatch="///", lw=0,
                    alpha=0.35, zorder=1, label=f"δL < s1_threshold ({s1_threshold:g}): S0 -> S1")  # fmt: skip
    ax.axhline(s1_threshold, color="tab:purple", lw=1, ls="--", zorder=1)
    s2 = ax.axhspan(-s2_threshold, s2_threshold, color="tab:cyan", alpha=0.45, lw=0, zorder=1,
                    label=f"|δL| < s2_threshold ({s2_threshold:g}): S1 -> S2")  # fmt: skip
    return [s1, s2]


def plot_seed(results, path):
    """2x2: test accuracy, training loss, δL with the thresholds, LR (log); shaded by the phase in force."""
    plt = pyplot()
    cfg = identity(results["config"]) | results["config"]
    phase_record = results[PHASE_AWARE]
    phases, transitions = phase_record["per_epoch"]["phase"], phase_record.get("transition_epochs", {})
    arms = [name for name in ARM_STYLES if name in results]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    dls = {}
    for name in arms:
        losses = results[name]["per_epoch"]["train_loss"]
        dls[name] = [dL_of(losses[: i + 1], cfg["dl_window"], cfg["dl_mode"]) for i in range(len(losses))]
    panels = [("eval_acc", "test accuracy (%)"), ("train_loss", "training loss"), ("dL", "δL"), ("lr", "learning rate")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        shade_phases(ax, phases)
        mark_detections(ax, transitions)
        for name in arms:
            values = dls[name] if key == "dL" else results[name]["per_epoch"][key]
            ax.plot(range(1, len(values) + 1), values, **ARM_STYLES[name])
        ax.set_title(title)
        epochs_axis(ax, cfg["epochs"])
    bands = threshold_bands(axes[1, 0], cfg["s1_threshold"], cfg["s2_threshold"], [v for d in dls.values() for v in d])
    if any(results[name]["per_epoch"]["lr"] for name in arms):
        axes[1, 1].set_yscale("log")  # not while empty: every arm diverged in its first epoch
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    arm_lines = [line for line in axes[0, 0].get_lines() if not line.get_label().startswith("_")]
    fig.legend(handles=arm_lines, loc="upper center", ncol=len(arms), frameon=False, bbox_to_anchor=(0.5, 0.955))
    fig.legend(handles=phase_handles(phases, transitions) + bands, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(f"{data_label(cfg)}, seed {cfg['seed']}, width {cfg['width']}, {cfg['epochs']} epochs")
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    save_figure(fig, path)


def plot_summary(results, summary, path):
    """The headline (each comparison's mean final-accuracy delta with its 95% interval and every seed's),
    the deltas over the epochs, and each arm's mean test accuracy."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    seeds, cfg = summary["seeds"], summary["config"]
    fig, (headline, gaps, curves) = plt.subplots(1, 3, figsize=(17, 5.8), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    others = [name for name in COMPARISONS if f"phase_aware_vs_{name}" in summary["comparisons"]]
    labels = []
    for row, other in enumerate(others):
        labels.append(
            draw_comparison(headline, row, summary["comparisons"][f"phase_aware_vs_{other}"]["final_acc"], other)
        )
        paired = [s for s in seeds if paired_delta(results[s], other, "final_acc") is not None]
        deltas = [np.subtract(*(results[s][n]["per_epoch"]["eval_acc"] for n in (PHASE_AWARE, other))) for s in paired]
        for delta in deltas:
            gaps.plot(range(1, len(delta) + 1), delta, color=comparison_color(other), lw=0.8, alpha=0.35)
        mean = mean_curve(deltas)
        gaps.plot(range(1, len(mean) + 1), mean, color=comparison_color(other), lw=2.2, label=COMPARISONS[other])
    headline.axvline(0, color="k", lw=0.8)
    headline.set_yticks(range(len(others)), labels)
    headline.set_ylim(len(others) - 0.5, -0.5)
    headline.set(title="final test accuracy: phase-aware minus the other arm", xlabel="accuracy points")
    for name in ARM_STYLES:
        if name in summary["arms"]:
            mean = mean_curve(
                [results[s][name]["per_epoch"]["eval_acc"] for s in seeds if results[s][name]["status"] == "ok"]
            )
            curves.plot(range(1, len(mean) + 1), mean, **ARM_STYLES[name])
    detected = sorted(
        {i + 1 for t in summary["transitions"].values() if (i := t.get(transition_key(S1_BOUNDARY))) is not None}
    )
    for ax in (gaps, curves):
        for epoch in detected:
            ax.axvline(epoch, color="k", ls=":", lw=1.1, zorder=1)
        epochs_axis(ax, cfg["epochs"])
        ax.set_xlabel("epoch")
    gaps.axhline(0, color="k", lw=0.8)
    gaps.set(title="test-accuracy delta over epochs (each seed, and the mean)", ylabel="accuracy points")
    curves.set(title="test accuracy, mean over seeds", ylabel="%")
    s1 = [Line2D([], [], color="k", ls=":", label=f"S1 detected (after epoch {', '.join(map(str, detected))})")]
    for ax in (gaps, curves):
        handles = [line for line in ax.get_lines() if not line.get_label().startswith("_")] + (s1 if detected else [])
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.suptitle(
        f"{data_label(cfg)}, width {cfg['width']}, {cfg['epochs']} epochs, "
        f"{cfg['val_size']:,} validation images, {cfg['precision']}: {len(seeds)} seeds"
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    save_figure(fig, path)


def comparison_color(other):
    return ARM_STYLES[other]["color"] if other != BASELINE else "0.35"


def draw_comparison(ax, row, stats, other):
    """One row of the headline: every seed's delta, their mean and its 95% interval; returns the
    row's label, which carries the numbers."""
    label = f"phase-aware {COMPARISONS[other]}"
    if stats is None:
        return f"{label}\nno seed with both arms healthy"
    color, deltas = comparison_color(other), list(stats["per_seed"].values())
    jitter = np.linspace(-0.15, 0.15, len(deltas)) if len(deltas) > 1 else [0.0]
    ax.scatter(deltas, row + np.asarray(jitter), color=color, alpha=0.55, s=28, zorder=3)
    ax.scatter([stats["mean"]], [row], color=color, marker="D", s=70, edgecolor="k", zorder=4)
    label += f"\nmean {stats['mean']:+.2f}, {stats['positive']}/{stats['total']} seeds > 0"
    if stats["ci95"] is None:
        return label + f"\nno interval or p: {stats['total']} seed(s)"
    low, high = stats["ci95"]
    ax.plot([low, high], [row, row], color=color, lw=2.5, zorder=2)
    return label + f"\n95% CI {low:+.2f}..{high:+.2f}, p = {stats['p_value']:.3f}"


def mean_curve(logs):
    """The mean over logs of unequal length (a diverged arm's is shorter), epoch by epoch."""
    if not logs:
        return np.array([])
    table = np.full((len(logs), max(map(len, logs))), np.nan)
    for row, log in zip(table, logs, strict=True):
        row[: len(log)] = log
    return np.nansum(table, axis=0) / np.maximum(np.sum(~np.isnan(table), axis=0), 1)


def plot_replay(rows, controller, path, title):
    plt = pyplot()
    fig, (losses, dls) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    epochs = [r["epoch"] + 1 for r in rows]
    phases = [r["phase"] for r in rows]
    for ax in (losses, dls):
        shade_phases(ax, phases)
        mark_detections(ax, controller.transition_epochs)
        epochs_axis(ax, len(rows))
    losses.plot(epochs, [r["train_loss"] for r in rows], color="tab:red", label="training loss")
    if any(r["eval_loss"] is not None for r in rows):
        held_out = [np.nan if r["eval_loss"] is None else r["eval_loss"] for r in rows]
        losses.plot(epochs, held_out, color="0.4", label="eval loss")
    losses.set(title=f"replay of {title}", ylabel="loss")
    dls.plot(epochs, [r["dL"] for r in rows], color="k", label="δL")
    bands = threshold_bands(dls, controller.s1_threshold, controller.s2_threshold, [r["dL"] for r in rows])
    dls.set(xlabel="epoch", ylabel="δL")
    handles = losses.get_lines() + dls.get_lines() + bands + phase_handles(phases, controller.transition_epochs)
    fig.legend(handles=[h for h in handles if not h.get_label().startswith("_")], loc="lower center", ncol=2,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    save_figure(fig, path)


def plot_study(rows, path, title):
    """Final accuracy per cell: each arm's seeds as dots, their means joined by a line."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    x = range(len(rows))
    arms = [arm for arm in ARMS if any(arm in row["final_acc"] for row in rows)]
    for offset, arm in zip(0.2 * (np.arange(len(arms)) - (len(arms) - 1) / 2), arms, strict=True):
        means = [row["final_acc"][arm]["mean"] if arm in row["final_acc"] else None for row in rows]
        style = {key: ARM_STYLES[arm][key] for key in ("color", "label")}
        (line,) = axis.plot([i + offset for i in x], means, marker="_", markersize=14, **style)
        for i, row in enumerate(rows):
            per_seed = row["final_acc"].get(arm, {}).get("per_seed", {})
            axis.scatter([i + offset] * len(per_seed), list(per_seed.values()), s=10, alpha=0.5, color=line.get_color())
    axis.set_xticks(list(x), [row["cell"] for row in rows], rotation=20)
    axis.set_ylabel("final test accuracy (%)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)
