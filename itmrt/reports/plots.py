"""PNG plots of a report (matplotlib, Agg backend, imported only when plotting).

- parity: ``score_errors.png`` (histogram of |variant - reference| per score, one
  panel per variant, log axes) and ``recall_by_variant.png`` (R@1/5/10 both ways);
- bench: ``latency_vs_batch.png`` (p50 latency per call against batch size, one
  panel per stage, a line per variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, overwrite: bool = True) -> str:
    """Write the figure as PNG; without ``overwrite``, only if ``path`` does not exist when it is renamed in."""
    import io

    from itmrt.publish import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)
    return path.name


def error_histograms(report: dict[str, Any], matrices: dict[str, np.ndarray], path: Path) -> str:
    plt = _pyplot()
    measured = [v for v in report["variants"] if v["status"] == "ok"]
    fig, axes = plt.subplots(
        len(measured), 1, figsize=(7, 2.6 * len(measured) + 0.6), squeeze=False, constrained_layout=True
    )
    reference = matrices["scores_reference.npy"].astype(np.float64)
    for ax, variant in zip(axes[:, 0], measured):
        diff = np.abs(matrices[variant["scores_file"]].astype(np.float64) - reference).ravel()
        diff = diff[np.isfinite(diff)]
        positive = diff[diff > 0]
        zeros = diff.size - positive.size
        if positive.size:
            low = max(positive.min(), 1e-12)
            bins = np.logspace(np.log10(low), np.log10(max(positive.max(), low * 10)), 40)
            ax.hist(positive, bins=bins, color="tab:blue")
            ax.set_xscale("log")
        ax.set_yscale("log")
        limit = variant["tolerances"]["score_max_abs"]
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"tolerance {limit:g}")
        ax.set_title(
            f"{variant['name']}: |score - reference| over {diff.size} pairs ({zeros} exactly equal)", fontsize=9
        )
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("absolute score error")
    fig.suptitle(f"Score error against the {report['reference']['against']} reference", fontsize=11)
    name = _save(fig, path)
    plt.close(fig)
    return name


def recall_bars(report: dict[str, Any], path: Path) -> str:
    plt = _pyplot()
    series = [("reference", report["reference"]["recall"])]
    series += [(v["name"], v["recall"]) for v in report["variants"] if v["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(series)
    x = np.arange(len(RECALL_KEYS))
    for index, (label, recall) in enumerate(series):
        values = [recall[k] for k in RECALL_KEYS]
        ax.bar(x + (index - (len(series) - 1) / 2) * width, values, width, label=f"{label} (rsum {recall['rsum']:.1f})")
    ax.set_xticks(x, [k.replace("_r", " R@") for k in RECALL_KEYS])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Recall by variant ({report['data']['split']}, {report['data']['images']} images)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    name = _save(fig, path)
    plt.close(fig)
    return name


def parity_plots(report: dict[str, Any], matrices: dict[str, np.ndarray], folder: Path) -> list[str]:
    names = [recall_bars(report, folder / "recall_by_variant.png")]
    if any(v["status"] == "ok" for v in report["variants"]):
        names.insert(0, error_histograms(report, matrices, folder / "score_errors.png"))
    return names


def latency_lines(report: dict[str, Any], path: Path) -> str | None:
    from itmrt.reports.bench import STAGES

    measured = [v for v in report["variants"] if v["status"] == "ok"]
    if not measured:
        return None
    plt = _pyplot()
    cols = 3
    rows = (len(STAGES) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, stage in zip(axes.ravel(), STAGES):
        for variant in measured:
            points = sorted(
                (r["batch_size"], r["latency_ms"]["p50"]) for r in variant["results"] if r["stage"] == stage
            )
            if points:
                batches, p50 = zip(*points)
                ax.plot(batches, p50, marker="o", label=variant["name"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = report["settings"]["batch_sizes"]
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("batch size (captions or images)")
        ax.set_ylabel("p50 latency per call (ms)")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(STAGES):]:
        ax.set_visible(False)
    fig.suptitle(f"Latency against batch size (gallery of {report['settings']['images']} images)", fontsize=11)
    fig.tight_layout()
    name = _save(fig, path)
    plt.close(fig)
    return name


def bench_plots(report: dict[str, Any], folder: Path) -> list[str]:
    name = latency_lines(report, folder / "latency_vs_batch.png")
    return [name] if name else []


def similarity_matrix(explanation: Any, path: Path, overwrite: bool = True) -> str:
    """``itmrt explain --png``: the word x region similarity matrix with NAAF's threshold marked.

    Colours are centred on the threshold (red above: matched, blue below), a
    dot marks every cell above it, a ring each word's best region, and the words
    whose negative branch fired are labelled ``[neg]``. ``explanation`` is an
    :class:`itmrt.runtime.explain.Explanation`.
    """
    from itmrt.optional import require

    require("matplotlib", "itmrt explain --png")
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    sims = np.asarray(explanation.similarities, dtype=np.float64)
    t = float(explanation.threshold)
    low, high = min(float(sims.min()), t - 1e-3), max(float(sims.max()), t + 1e-3)
    words, regions = sims.shape
    fig, ax = plt.subplots(figsize=(min(16.0, 2.5 + 0.3 * regions), 1.6 + 0.32 * words))
    image = ax.imshow(sims, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=t, vmin=low, vmax=high), aspect="auto")
    above = np.argwhere(sims > t)
    ax.scatter(above[:, 1], above[:, 0], s=6, c="black", label=f"s > threshold {t:.3f}")
    best = [w.best_region for w in explanation.words]
    ax.scatter(best, range(words), s=60, facecolors="none", edgecolors="black", linewidths=1.0, label="best region")
    ax.set_yticks(
        range(words), [w.word + (" [neg]" if w.negative_fired else "") for w in explanation.words], fontsize=8
    )
    ax.set_xlabel("region")
    bar = fig.colorbar(image, ax=ax, fraction=0.04)
    bar.ax.axhline(t, color="black", linewidth=1.5)
    bar.set_label("word . region similarity (line: threshold)")
    scorer = "" if explanation.scorer_score is None else f"; scorer {explanation.scorer_score:.4f}"
    ax.set_title(
        f"image {explanation.image}: \"{explanation.caption}\"\nscore {explanation.score:.4f}{scorer}", fontsize=9
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12 - 0.4 / max(words, 1)), ncol=2, frameon=False)
    name = _save(fig, path, overwrite)
    plt.close(fig)
    return name
