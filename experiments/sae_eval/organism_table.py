"""The organism's text-only versus joint SAE table (experiments/sae_eval/README.md) from two sae_eval sweeps.

python experiments/sae_eval/organism_table.py joint=<sweep dir> text_only=<sweep dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [  # (metric key, header); a column no run has (a splice site left out) is left out
    ("image_explained_variance", "image EV"),
    ("text_explained_variance", "text EV"),
    ("image_cossim", "image cossim"),
    ("image_l2_ratio", "image L2 ratio"),
    ("image_frac_dead", "dead on images"),
    ("image_ce_loss_score", "CE score, image splice"),
    ("image_kl_div_score", "KL score, image splice"),
    ("text_ce_loss_score", "CE score, text splice"),
    ("both_ce_loss_score", "CE score, both"),
    ("ce_loss_without_sae", "CE clean"),
    ("image_ce_loss_with_ablation", "CE, image zeroed"),
    ("image_ce_loss_with_sae", "CE, image spliced"),
]


def cell(metrics: dict, key: str) -> str:
    value, null = metrics[key], metrics.get(f"{key}_null_mean")
    if null is None:
        return f"{value:.3g}"
    return f"{value:.3f} ({null:.3f}, p {metrics[f'{key}_p']:.2g})"


def main(args: list[str]) -> None:
    runs = []
    for arg in args:
        label, sweep = arg.split("=", 1)
        results = [json.loads(p.read_text()) for p in Path(sweep).glob("*/result.json")]
        runs += [(label, result) for result in sorted(results, key=lambda r: r["layer"])]
    columns = [(k, h) for k, h in COLUMNS if any(k in r["metrics"] for _, r in runs)]
    print("| SAE | layer | " + " | ".join(h for _, h in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for label, result in runs:
        print(f"| {label} | {result['layer']} | " + " | ".join(cell(result["metrics"], k) for k, _ in columns) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
