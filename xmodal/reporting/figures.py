"""Figures for the studies. Each function returns a matplotlib Figure."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # jobs run headless, on clusters too

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator


def jaccard_vs_baseline(concepts: pd.DataFrame, top_k: int, layer: int) -> plt.Figure:
    """Per concept: top-k Jaccard of its own text and image, against mismatched pairs."""
    frame = concepts.sort_values("jaccard_topk")
    y = np.arange(len(frame))
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(frame) + 1)))
    ax.barh(y, frame["jaccard_topk"], color="tab:blue", label="matched text-image pair")
    ax.scatter(frame["jaccard_topk_null"], y, color="black", marker="|", s=120, zorder=3, label="mismatched pairs (mean)")
    ax.set_yticks(y, frame["concept"], fontsize=7)
    ax.set_xlabel(f"Jaccard overlap of the top-{top_k} features (SAE latents, or residual dimensions with sae=none)")
    ax.set_title(f"Cross-modal feature overlap per concept, layer {layer}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / max(len(frame), 1)), ncol=2, fontsize=8, frameon=False)
    return fig


def crossmodal_heatmap(text: np.ndarray, image: np.ndarray, concepts: list[str], features: np.ndarray, layer: int) -> plt.Figure:
    """Top cross-modal features (columns) over concepts (rows), text and image side by side.

    Each feature is scaled by its maximum over both modalities, so a column's colours
    compare directly between the two panels.
    """
    scale = np.maximum(np.abs(text[:, features]).max(axis=0), np.abs(image[:, features]).max(axis=0))
    scale[scale == 0] = 1
    signed = bool((text[:, features] < 0).any() or (image[:, features] < 0).any())  # raw residuals, no SAE
    cmap, vmin = ("RdBu_r", -1) if signed else ("magma", 0)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * max(len(features), 4) * 2, 1.5 + 0.25 * len(concepts)), sharey=True)
    for ax, matrix, title in [(axes[0], text, "text"), (axes[1], image, "image")]:
        im = ax.imshow(matrix[:, features] / scale, aspect="auto", cmap=cmap, vmin=vmin, vmax=1)
        ax.set_xticks(range(len(features)), [str(f) for f in features], rotation=90, fontsize=7)
        ax.set_title(f"{title} activation")
        ax.set_xlabel("SAE feature")
    axes[0].set_yticks(range(len(concepts)), concepts, fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="activation / feature max")
    fig.suptitle(f"Top cross-modal features by text-image correlation, layer {layer}")
    return fig


def null_distributions(null_table: pd.DataFrame, nulls: dict[str, np.ndarray], layer: int) -> plt.Figure:
    """Each statistic's mismatched-pair null distribution, with the matched value marked."""
    names = list(nulls)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8))
    for ax, name in zip(np.atleast_1d(axes), names):
        row = null_table.set_index("statistic").loc[name]
        ax.hist(nulls[name][np.isfinite(nulls[name])], bins=30, color="grey", alpha=0.8)
        ax.axvline(row["observed"], color="tab:red", lw=2)
        ax.set_title(f"{name}\np = {row['p_value']:.3g}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Matched pairs (red) against shuffled pairs (grey), layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def concept_kernels(side_a: np.ndarray, side_b: np.ndarray, concepts: list[str], labels: tuple[str, str], layer: int) -> plt.Figure:
    """Concept-by-concept cosine similarity on each side, after removing the mean over concepts (what
    linear CKA compares; raw residuals share one large direction that would put every cosine near 1)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, side, label in zip(axes, (side_a, side_b), labels):
        centred = side - side.mean(axis=0, keepdims=True)
        norm = np.linalg.norm(centred, axis=1, keepdims=True)
        unit = centred / np.where(norm > 0, norm, 1)
        kernel = unit @ unit.T
        np.fill_diagonal(kernel, np.nan)  # the diagonal (1) would set the colour scale
        im = ax.imshow(kernel, cmap="viridis")
        ax.set_xticks(range(len(concepts)), concepts, rotation=90, fontsize=6)
        ax.set_yticks(range(len(concepts)), concepts, fontsize=6)
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.suptitle(f"Cosine similarity between concepts, centred over concepts, layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def lens_rates(summary: pd.DataFrame, layer: int) -> plt.Figure:
    """Each lens measure's hit rate (bar) against its shuffled-label null (mean and 95% range) and chance."""
    y = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(summary) + 1.4))
    ax.barh(y, summary["rate"], color="tab:blue", label="own concept")
    spread = np.clip([summary["null_mean"] - summary["null_q025"], summary["null_q975"] - summary["null_mean"]], 0, None)  # rounding
    ax.errorbar(summary["null_mean"], y, xerr=spread, fmt="|", color="black", ms=14, capsize=3, label="shuffled labels (mean, 95%)")
    ax.scatter(summary["chance"], y, marker="x", color="tab:red", zorder=3, label="chance (k / concepts)")
    ax.set_yticks(y, [f"{m} (k={k}; p={p:.2g})" for m, k, p in zip(summary["measure"], summary["k"], summary["p"])], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of images (or words) whose own concept is read out")
    ax.set_title(f"Logit lens and nearest words, layer {layer}", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def concept_geometry(text: np.ndarray, image: np.ndarray, concepts: list[str], categories: list[str], layer: int) -> plt.Figure:
    """Text (circles) and image (squares) codes of every concept in one 2-D PCA embedding, each pair joined.

    One PCA is fitted on both modalities together, so distances between the two point clouds mean
    something; a short line is a concept whose text and image codes lie close.
    """
    from sklearn.decomposition import PCA

    both = np.vstack([text, image])
    points = PCA(n_components=2, random_state=0).fit_transform(both) if both.shape[1] >= 2 and len(both) >= 2 else np.zeros((len(both), 2))
    text_xy, image_xy = points[: len(text)], points[len(text) :]
    palette = plt.get_cmap("tab10")
    colour = {c: palette(i % 10) for i, c in enumerate(dict.fromkeys(categories))}
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for (tx, ty), (ix, iy), name, category in zip(text_xy, image_xy, concepts, categories):
        ax.plot([tx, ix], [ty, iy], color=colour[category], lw=0.7, alpha=0.6)
        ax.scatter([tx], [ty], marker="o", color=colour[category], s=28)
        ax.scatter([ix], [iy], marker="s", color=colour[category], s=28)
        ax.annotate(name, (tx, ty), fontsize=6, alpha=0.8)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k or "(none)") for k, c in colour.items()]
    handles += [plt.Line2D([], [], color="grey", marker="o", ls="", label="text"), plt.Line2D([], [], color="grey", marker="s", ls="", label="image")]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"Concept geometry: text and image codes in one PCA, pairs joined, layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def patch_heatmap(ax: plt.Axes, image: Any, token_map: np.ndarray, vmax: float, title: str) -> None:
    """An image with one feature's activation at each image token drawn over it, one block per token."""
    array = np.asarray(image)
    height, width = array.shape[:2]
    ax.imshow(array)
    shown = np.ma.masked_where(token_map <= 0, token_map)  # inactive tokens leave the image visible
    ax.imshow(shown, cmap="inferno", alpha=0.6, vmin=0, vmax=vmax if vmax > 0 else 1, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def patch_heatmap_rows(rows: list[tuple[str, list, list[np.ndarray], list[str]]], layer: int) -> plt.Figure:
    """One row per feature (label, images, token maps, image concepts): where on each image it fires."""
    cols = max((len(images) for _, images, _, _ in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols + 1.2, 2.0 * len(rows) + 0.4), squeeze=False)
    for ax_row, (label, images, maps, concepts) in zip(axes, rows):
        vmax = max((float(m.max()) for m in maps), default=0.0)
        for c, ax in enumerate(ax_row):
            if c < len(images):
                patch_heatmap(ax, images[c], maps[c], vmax, f"{concepts[c]} (peak {maps[c].max():.3g})")
            else:
                ax.axis("off")
        ax_row[0].set_ylabel(label, fontsize=8)
        if not images:
            ax_row[0].text(0.5, 0.5, "inactive on every image", ha="center", va="center", fontsize=8)
    fig.suptitle(f"Where each feature fires on its top images, layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def feature_card(
    feature: int,
    layer: int,
    images: list,
    token_maps: list[np.ndarray],
    image_concepts: list[str],
    words: pd.DataFrame,
    text_pooled: np.ndarray,
    image_pooled: np.ndarray,
    stats: dict,
) -> plt.Figure:
    """One SAE feature: top images with patch heat maps, top concept words, activation histograms per modality."""
    n = max(len(images), 1)
    fig = plt.figure(figsize=(max(2.0 * n, 9), 6.2))
    grid = fig.add_gridspec(2, max(n, 3), height_ratios=[1, 1.15])
    vmax = max((float(m.max()) for m in token_maps), default=0.0)
    for i, (image, token_map, concept) in enumerate(zip(images, token_maps, image_concepts)):
        patch_heatmap(fig.add_subplot(grid[0, i]), image, token_map, vmax, f"{concept}\npeak {token_map.max():.3g}")
    third = max(n, 3) // 3
    words_ax = fig.add_subplot(grid[1, :third])
    ranked = words.sort_values("rank")
    words_ax.barh(np.arange(len(ranked)), ranked["activation"], color="tab:orange")
    words_ax.set_yticks(np.arange(len(ranked)), [f"{c} [{t.strip()}]" for c, t in zip(ranked["concept"], ranked["peak_token"])], fontsize=7)
    words_ax.invert_yaxis()
    words_ax.set_title("top concept words [peak token]", fontsize=8)
    words_ax.tick_params(axis="x", labelsize=7)
    hist_ax = fig.add_subplot(grid[1, third : 2 * third])
    top = max(float(np.max(text_pooled, initial=0)), float(np.max(image_pooled, initial=0)), 1e-9)
    bins = np.linspace(0, top, 21)
    hist_ax.hist(image_pooled, bins=bins, alpha=0.6, label=f"images ({(image_pooled > 0).mean():.0%} active)", color="tab:blue")
    hist_ax.hist(text_pooled, bins=bins, alpha=0.6, label=f"words ({(text_pooled > 0).mean():.0%} active)", color="tab:orange")
    hist_ax.set_yscale("log")
    hist_ax.legend(fontsize=7)
    hist_ax.set_title("pooled activation per modality", fontsize=8)
    hist_ax.tick_params(labelsize=7)
    text_ax = fig.add_subplot(grid[1, 2 * third :])
    text_ax.axis("off")
    text_ax.text(
        0,
        0.95,
        "\n".join(
            [
                f"cross-modal r {stats['crossmodal_r']:.3f}",
                f"  re-paired 97.5% {stats['crossmodal_r_null_q975']:.3f}, p = {stats['crossmodal_r_p']:.3g}",
                f"MDS {stats['mds']:.3f} (1 = images only)",
                f"  modality-swap 95% {stats['mds_null_q025']:.3f} to {stats['mds_null_q975']:.3f}",
                f"mean activation: words {stats['mean_text']:.3g}, images {stats['mean_image']:.3g}",
            ]
        ),
        va="top",
        fontsize=8,
        family="monospace",
    )
    fig.suptitle(f"Feature {feature}, layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def mds_histogram(mds: np.ndarray, mu: float, sigma: float, null_mds: np.ndarray, layer: int) -> plt.Figure:
    """Distribution of the Modality Dominance Score with the ImgD / TextD split lines."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 41)
    ax.hist(null_mds[np.isfinite(null_mds)], bins=bins, density=True, color="grey", alpha=0.45, label="null: modalities swapped at random")
    ax.hist(mds[np.isfinite(mds)], bins=bins, density=True, color="tab:purple", alpha=0.8, label="features")
    for x, name in [(mu - sigma, "TextD | CrossD"), (mu + sigma, "CrossD | ImgD")]:
        ax.axvline(x, color="black", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1] * 0.5, name, rotation=90, va="center", ha="right", fontsize=7)
    ax.set_xlabel("MDS: image / (image + text) activation")
    ax.set_ylabel("density")
    ax.set_title(f"Modality Dominance Score of active features, layer {layer}")
    ax.legend(fontsize=7, loc="upper center")
    return fig


def probe_accuracy(table: pd.DataFrame, layer: int) -> plt.Figure:
    """Accuracy of each probe against chance and the label-shuffled control."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(table))
    ax.bar(x, table["accuracy"], color="tab:green", label="probe accuracy")
    ax.scatter(x, table["chance"], marker="_", s=400, color="black", zorder=3, label="chance (majority class)")
    ax.errorbar(
        x,
        table["shuffled_mean"],
        yerr=[np.zeros(len(table)), table["shuffled_q975"] - table["shuffled_mean"]],
        fmt="o",
        color="grey",
        capsize=3,
        zorder=3,
        label="shuffled labels (mean, 97.5%)",
    )
    ax.set_xticks(x, table["probe"].str.replace("_", " "), rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy")
    ax.set_title(f"Linear probes on codes, layer {layer}")
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    return fig


def top_n_curve(table: pd.DataFrame, layer: int) -> plt.Figure:
    """Seed 003's top-N: image-probe macro F1 and accuracy against N, with the shuffled-label control."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = np.arange(len(table))
    ax.plot(x, table["macro_f1"], marker="o", color="tab:green", label="macro F1")
    ax.plot(x, table["accuracy"], marker=".", ls="--", color="tab:olive", label="accuracy")
    ax.fill_between(x, table["shuffled_mean"], table["shuffled_q975"], color="grey", alpha=0.3, label="shuffled labels (mean to 97.5%), accuracy")
    ax.plot(x, table["chance"], ls=":", color="black", label="chance (majority class)")
    ax.set_xticks(x, [f"top-{n}" if n != "all" else "all (sum)" for n in table["top_n"]])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("SAE features kept per image token, then summed over tokens")
    ax.set_ylabel("image probe")
    ax.set_title(f"Top-N pooling (seed 003), layer {layer}")
    ax.legend(fontsize=7, frameon=False)
    return fig


def shift_distribution(delta: np.ndarray, cosine: np.ndarray, cosine_null: np.ndarray, layer: int, base: str, vlm: str) -> plt.Figure:
    """Left: coefficient differences (VLM - base). Right: per-prompt cosine against mismatched prompts."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    changed = delta[delta != 0]
    if changed.size:
        left.hist(changed, bins=60, color="tab:orange")
    else:
        left.text(0.5, 0.5, "no coefficient changed", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel(f"coefficient change ({vlm} - {base})")
    left.set_ylabel("count (non-zero changes)")
    bins = np.linspace(-1, 1, 41)
    right.hist(cosine_null[np.isfinite(cosine_null)], bins=bins, color="grey", alpha=0.6, label="mismatched prompts")
    right.hist(cosine[np.isfinite(cosine)], bins=bins, color="tab:blue", alpha=0.8, label="same prompt")
    right.set_xlabel("cosine of code vectors")
    right.legend(fontsize=7)
    fig.suptitle(f"Representation shift of text prompts, layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def dose_response(summary: pd.DataFrame, concept: str, layer: int) -> plt.Figure:
    """Steering: how often descriptions name the concept, and its log-probability change, against strength."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for condition, group in summary.groupby("condition", sort=False):
        label = f"{condition} (layer {int(group['layer'].iloc[0])})"
        line = ax1.plot(group["strength"], group["mention_rate"], marker="o", label=label)[0]
        ax1.fill_between(group["strength"], group["mention_rate_ci_low"], group["mention_rate_ci_high"], color=line.get_color(), alpha=0.15)
        ax2.plot(group["strength"], group["delta_logprob"], marker="o", color=line.get_color(), label=label)
        ax2.fill_between(group["strength"], group["delta_logprob_ci_low"], group["delta_logprob_ci_high"], color=line.get_color(), alpha=0.15)
    ax1.set(
        xlabel="strength (x the feature's largest activation)",
        ylabel=f"descriptions naming '{concept}'",
        ylim=(-0.05, 1.05),
        title=f"steering at layer {layer} (bands: 95% bootstrap CI)",
    )
    ax2.set(xlabel="strength", ylabel=f"change in log p('{concept}') at the first answer token", title="first-token effect")
    ax2.axhline(0, color="grey", lw=0.8)
    ax1.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def das_trajectory(trajectory: pd.DataFrame, layer: int) -> plt.Figure:
    """DAS: each concept's cosine (mean over its augmented copies) against optimisation step."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for concept, group in trajectory.groupby("concept", sort=False):
        ax.plot(group["step"], group["cosine"], lw=1.2, label=concept)
    ax.set(xlabel="optimisation step", ylabel="cos(image representation, concept vector)", title=f"DAS at layer {layer}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def image_grid(images: list[list], row_labels: list[str], column_labels: list[str], title: str) -> plt.Figure:
    """A contact sheet: images[row][column] (PIL images, or None for a gap)."""
    rows, cols = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.6, 1.6 * rows + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images[r][c] if c < len(images[r]) else None
            if image is not None:
                ax.imshow(image, interpolation="nearest")
            if r == 0:
                ax.set_title(column_labels[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def das_sheet(images: list, concepts: list[str], layer: int) -> plt.Figure:
    return image_grid([images], [f"layer {layer}"], concepts, "DAS images")


def apples_oranges(pairs: pd.DataFrame, summary: pd.DataFrame, names: tuple[str, ...], layer: int) -> plt.Figure:
    """Appendix A: cosine of each concept vector with matched and mismatched images, by layer."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    noise = pairs["image_concept"] == "white noise"  # the appendix's control images, drawn on their own
    if noise.any():
        means = pairs[noise].groupby("layer")["cosine"].mean()
        ax1.plot(means.index, means.values, marker=".", ls=":", color="grey", label="white-noise images (control)")
    pairs = pairs[~noise]
    if len(names) == 2:  # every concept-images pair
        means = pairs.groupby(["layer", "concept", "image_concept"])["cosine"].mean().reset_index()
        for (concept, image_concept), group in means.groupby(["concept", "image_concept"], sort=False):
            ax1.plot(group["layer"], group["cosine"], marker=".", ls="-" if concept == image_concept else "--", label=f"'{concept}' vs {image_concept} images")
    else:  # k^2 lines would hide the point: matched against mismatched pairs
        means = pairs.groupby(["layer", "matched"])["cosine"].mean().reset_index()
        for matched, group in means.groupby("matched"):
            ax1.plot(
                group["layer"],
                group["cosine"],
                marker=".",
                ls="-" if matched else "--",
                label=f"{'matched' if matched else 'mismatched'} pairs ({len(names)} concepts)",
            )
    ax1.set(xlabel="decoder layer", ylabel="cosine (mean over images)", title="concept vector vs real images")
    ax1.legend(fontsize=7)
    ax2.plot(summary["layer"], summary["gap"], marker="o", label="matched - mismatched")
    ax2.fill_between(summary["layer"], summary["gap_null_q025"], summary["gap_null_q975"], alpha=0.2, lw=0, label="label-permutation 95%")
    significant = summary[summary["gap_p"] < 0.05]
    ax2.scatter(significant["layer"], significant["gap"], color="black", zorder=3, s=12, label="p < 0.05")
    for ax in (ax1, ax2):
        ax.axvline(layer, color="grey", lw=0.8, ls=":")
        ax.axhline(0, color="grey", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    label = " / ".join(names) if len(names) <= 3 else f"{len(names)} concepts"
    ax2.set(xlabel="decoder layer", ylabel="cosine gap", title=f"{label}: matched minus mismatched")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
