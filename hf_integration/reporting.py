"""How a data-weighting run reports: how well its weights find the corrupted examples, the plot of their
distribution, and the end-of-run table of the bilevel model against its rivals.

The figures: the AUC of "low weight" as a detector of the ``corrupted`` flags (``sklearn.metrics.roc_auc_score``),
per corruption kind too, the precision of the lowest-weighted ``k`` examples (``k`` the number of corrupted ones),
the mean weights of clean and corrupted examples and the spread (std/mean) of all weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .atomic_files import atomic_write
from .runs import describe_steps, format_table

__all__ = ["calibration_error", "ranking_aucs", "weights_auc", "ranking_figures", "auc_by_kind", "plot_weights", "print_summary"]


def weights_auc(weights: np.ndarray, corrupted: np.ndarray) -> float:
    """ROC AUC of ``-weight`` as a score for ``corrupted`` (1 = every corrupted example has a lower weight than every
    clean one, 0.5 = chance); NaN when only one group is present."""
    from sklearn.metrics import roc_auc_score

    corrupted = np.asarray(corrupted, dtype=bool)
    if corrupted.all() or not corrupted.any():
        return math.nan
    return float(roc_auc_score(corrupted.astype(int), -np.asarray(weights)))


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: ``sum_b (n_b / n) |accuracy_b - confidence_b|`` over ``bins`` equal-width bins of
    the confidence ``max_c p(c | x)`` (Guo et al., 2017), in [0, 1]; 0 when the confidence of each bin equals its
    accuracy. ``probs``: ``(n, num_classes)`` rows summing to 1; ``labels``: ``(n,)`` class indices."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == np.asarray(labels)).astype(np.float64)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)  # bin b: [b/bins, (b+1)/bins), 1 in the last
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(correct)) if len(correct) else math.nan


def ranking_figures(weights: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    """``auc_low_weight_vs_corrupted``, ``precision_at_num_corrupted``, ``mean_weight_clean``,
    ``mean_weight_corrupted`` (NaN where a group is empty) and ``weight_spread`` (std/mean of all weights)."""
    w, corrupted = np.asarray(weights, dtype=float), np.asarray(corrupted, dtype=bool)
    k = int(corrupted.sum())
    return {
        "auc_low_weight_vs_corrupted": weights_auc(w, corrupted),
        "precision_at_num_corrupted": float(corrupted[np.argsort(w, kind="stable")[:k]].mean()) if k else math.nan,
        "mean_weight_clean": float(w[~corrupted].mean()) if (~corrupted).any() else math.nan,
        "mean_weight_corrupted": float(w[corrupted].mean()) if k else math.nan,
        "weight_spread": float(np.std(w) / max(float(np.mean(w)), 1e-12)) if len(w) else math.nan,
    }


def auc_by_kind(weights: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    """The AUC of "low weight" for each corruption kind (``""`` marks the clean examples) against the clean ones."""
    kinds = np.asarray(kinds)
    clean = kinds == ""
    return {kind: weights_auc(np.concatenate([weights[clean], weights[kinds == kind]]),
                              np.concatenate([np.zeros(clean.sum(), bool), np.ones((kinds == kind).sum(), bool)]))
            for kind in sorted(set(kinds.tolist()) - {""})}


def plot_weights(weights: np.ndarray, corrupted: np.ndarray | None, path: str, title: str) -> None:
    """Histogram of the learned weights, clean and corrupted examples separately (PNG, matplotlib Agg), written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(0.0, 1.0, 41)
    if corrupted is not None and corrupted.any():
        ax.hist(weights[~corrupted], bins=bins, alpha=0.6, label=f"clean ({(~corrupted).sum()})", color="tab:blue")
        ax.hist(weights[corrupted], bins=bins, alpha=0.6, label=f"corrupted ({corrupted.sum()})", color="tab:red")
    else:
        ax.hist(weights, bins=bins, color="tab:blue", label=f"all ({len(weights)})")
    ax.legend()
    ax.set_xlabel("learned weight")
    ax.set_ylabel("training examples")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def ranking_aucs(metrics: Mapping[str, Any]) -> tuple[float | None, dict[str, float] | None]:
    """A filter rival's ranking AUC and AUC by corruption kind (:func:`hf_integration.rivals.filter_ranking`)."""
    for key in ("auc_high_loss", "auc_ranking"):
        if metrics.get(f"{key}_vs_corrupted") is not None:
            return metrics[f"{key}_vs_corrupted"], metrics.get(f"{key}_by_corruption")
    return None, None


def print_summary(results: Mapping[str, Any], *, rival_labels: Mapping[str, str],
                  metrics: Sequence[tuple[str, str, str]], what: str,
                  bilevel_label: str = "learned data weights (bilevel)") -> None:
    """The end-of-run tables: the bilevel model and each rival on the ``metrics`` of each split (``(key, header,
    format)``: ``"{role}_" + key`` in a model's metrics, formatted ``"percent"`` or ``"float"``), the ranking figures
    of the weights against the corrupted flags, and the AUC by corruption kind when there are kinds. ``what`` names
    the corrupted things (``"labels"``, ``"responses"``)."""
    bilevel = results["reweighted"]
    roles = [r for r in ("validation", "test") if any(f"{r}_{key}" in bilevel for key, _, _ in metrics)]
    columns = [(role, key, header, fmt) for key, header, fmt in metrics for role in roles if f"{role}_{key}" in bilevel]

    def cell(value: float, fmt: str) -> Any:
        return f"{100 * value:.1f}%" if fmt == "percent" else value

    def row(name: str, values: Mapping[str, Any], seconds: float) -> list:
        return [name, *(cell(values[f"{r}_{k}"], f) for r, k, _, f in columns), f"{seconds:.0f}"]

    header = ["model", *(f"{r} {h}" for r, _, h, _ in columns), "train time (s)"]
    rows = [row(bilevel_label, bilevel, results["wall_time_bilevel_s"])]
    rows += [row(rival_labels[name], m, m["wall_time_s"]) for name, m in results["baselines"].items()]
    print()
    print(f"Data: {results['data']}: {results['num_train']} training examples, {results['num_corrupted']} with corrupted "
          f"{what}; {describe_steps(results)} (hvp_mode {results['hvp_mode']}).")
    print(format_table(header, rows))
    if results["num_corrupted"]:
        header = ["AUC (low weight vs corrupted)", "precision@#corrupted", "mean weight clean", "mean weight corrupted"]
        values = [results[k] for k in ("auc_low_weight_vs_corrupted", "precision_at_num_corrupted",
                                       "mean_weight_clean", "mean_weight_corrupted")]
        rankings = {name: ranking_aucs(m) for name, m in results["baselines"].items()}
        for name, (auc, _) in rankings.items():
            if auc is not None:
                header.append(f"AUC of the {name.replace('_', ' ')}'s ranking")
                values.append(auc)
        print(format_table(header, [values]))
        kinds = list(results.get("auc_low_weight_by_corruption", {}))
        if kinds:
            table = [["bilevel weights", *(results["auc_low_weight_by_corruption"][k] for k in kinds)]]
            table += [[name.replace("_", " "), *(by_kind[k] for k in kinds)]
                      for name, (_, by_kind) in rankings.items() if by_kind]
            print(format_table(["AUC by corruption kind", *kinds], table))
    print(f"Total wall time: {results['wall_time_total_s']:.0f} s.")
