"""Figures: a seed's four panels shaded by phase, the multi-seed summary, and a replay."""

import itertools

import numpy as np

from phase_controller import S0_EXPLORE, S1_BOUNDARY, S2_AXIS_LOCK, S3_POLISH, dL_of

from .data import data_label
from .files import write_atomically
from .records import ARMS, BASELINE, CONTROL, METRICS, PHASE_AWARE, paired_delta
from .settings import identity

PHASE_COLORS = {S0_EXPLORE: "#dddddd", S1_BOUNDARY: "#ffd8a8", S2_AXIS_LOCK: "#a5d8ff", S3_POLISH: "#b2f2bb"}
ARM_STYLES = {
    BASELINE: ("tab:gray", "baseline"),
    PHASE_AWARE: ("tab:red", "phase-aware"),
    CONTROL: ("tab:blue", "LR-matched control"),
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shade_phases(ax, phases):
    """Background colour by the phase the controller was in after each epoch: one band per run of
    epochs in the same phase, so a long log costs a few bands, not one per epoch."""
    start = 0
    for phase, span in itertools.groupby(phases):
        length = len(list(span))
        ax.axvspan(start - 0.5, start + length - 0.5, color=PHASE_COLORS[phase], alpha=0.5, lw=0)
        start += length


def mark_transitions(ax, transition_epochs):
    for key, epoch in transition_epochs.items():
        ax.axvline(epoch, color="k", ls=":", lw=1)
        ax.annotate(f" {key}", (epoch, 0.98), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8)


def phase_legend(fig):
    from matplotlib.patches import Patch

    handles = [Patch(color=color, alpha=0.5, label=phase) for phase, color in PHASE_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)


def save_figure(fig, path):
    plt = pyplot()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_seed(results, path):
    """2x2: test accuracy, training loss, dL with the S1 threshold, LR (log); shaded by phase."""
    plt = pyplot()
    cfg, phase_record = identity(results["config"]) | results["config"], results[PHASE_AWARE]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    panels = [
        ("eval_acc", "test accuracy (%)"),
        ("train_loss", "training loss"),
        ("dL", "dL (smoothed loss slope)"),
        ("lr", "learning rate"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        shade_phases(ax, phase_record["per_epoch"]["phase"])
        mark_transitions(ax, phase_record.get("transition_epochs", {}))
        for name in ARMS:
            if name not in results:
                continue
            log = results[name]["per_epoch"]
            values = (
                log[key]
                if key != "dL"
                else [
                    dL_of(log["train_loss"][: i + 1], cfg["dl_window"], cfg["dl_mode"])
                    for i in range(len(log["train_loss"]))
                ]
            )
            color, label = ARM_STYLES[name]
            ax.plot(range(len(values)), values, color=color, label=label, lw=1.6)
        ax.set_title(title)
    axes[1, 0].axhline(cfg["s1_threshold"], color="tab:orange", ls="--", lw=1, label="S1 threshold")
    if any(results[name]["per_epoch"]["lr"] for name in ARM_STYLES if name in results):
        axes[1, 1].set_yscale("log")  # not while empty: every arm diverged in its first epoch
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(loc="lower right")
    axes[1, 0].legend(loc="lower right")
    fig.suptitle(f"{data_label(cfg)}, seed {cfg['seed']}, width {cfg['width']}, {cfg['epochs']} epochs")
    phase_legend(fig)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path)


def plot_summary(results, summary, path):
    """Mean +- std test accuracy per arm across seeds with transition marks; per-seed deltas as bars."""
    plt = pyplot()
    seeds = summary["seeds"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for name in summary["arms"]:
        logs = [results[s][name]["per_epoch"]["eval_acc"] for s in seeds]
        epochs = max(map(len, logs))
        table = np.full((len(logs), epochs), np.nan)
        for row, log in zip(table, logs, strict=True):
            row[: len(log)] = log
        count = np.sum(~np.isnan(table), axis=0)
        mean = np.nansum(table, axis=0) / np.maximum(count, 1)
        spread = np.sqrt(np.nansum((table - mean) ** 2, axis=0) / np.maximum(count - 1, 1))
        color, label = ARM_STYLES[name]
        curves.plot(range(epochs), mean, color=color, label=label)
        curves.fill_between(range(epochs), mean - spread, mean + spread, color=color, alpha=0.2)
    for seed in seeds:
        for key, epoch in summary["transitions"][str(seed)].items():
            curves.axvline(epoch, color="k", ls=":", lw=0.8, alpha=0.6)
            curves.annotate(key, (epoch, 0.01), xycoords=("data", "axes fraction"), fontsize=7)
    curves.set(title=f"test accuracy, mean +- std over {len(seeds)} seeds", xlabel="epoch", ylabel="%")
    curves.legend(loc="lower right")
    x = np.arange(len(seeds))
    comparisons = [(name, metric) for name in summary["comparisons"] for metric in METRICS]
    width = 0.8 / len(comparisons)
    for i, (name, metric) in enumerate(comparisons):
        other = name.removeprefix("phase_aware_vs_")
        values = [paired_delta(results[s], other, metric) for s in seeds]
        bars.bar(x + i * width, [np.nan if v is None else v for v in values], width, label=f"{metric} vs {other}")
    bars.axhline(0, color="k", lw=0.8)
    bars.set_xticks(x + width * (len(comparisons) - 1) / 2, [str(s) for s in seeds])
    bars.set(title="phase-aware minus other arm, per seed", xlabel="seed", ylabel="accuracy points")
    bars.legend()
    fig.suptitle(data_label(summary["config"]))
    fig.tight_layout()
    save_figure(fig, path)


def plot_replay(rows, controller, path, title):
    plt = pyplot()
    fig, (losses, slope) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    epochs = [r["epoch"] for r in rows]
    for ax in (losses, slope):
        shade_phases(ax, [r["phase"] for r in rows])
        mark_transitions(ax, controller.transition_epochs)
    losses.plot(epochs, [r["train_loss"] for r in rows], color="tab:red", label="train loss")
    if any(r["eval_loss"] is not None for r in rows):
        losses.plot(
            epochs,
            [np.nan if r["eval_loss"] is None else r["eval_loss"] for r in rows],
            color="tab:gray",
            label="eval loss",
        )
    losses.set(title=f"replay of {title}", ylabel="loss")
    losses.legend()
    slope.plot(epochs, [r["dL"] for r in rows], color="k", label="dL")
    slope.axhline(controller.s1_threshold, color="tab:orange", ls="--", lw=1, label="S1 threshold")
    slope.axhspan(
        -controller.s2_threshold, controller.s2_threshold, color="tab:blue", alpha=0.15, label="|dL| < S2 threshold"
    )
    slope.set(xlabel="epoch", ylabel="dL")
    slope.legend()
    phase_legend(fig)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)
