"""The organism's text-only versus joint SAE table (experiments/sae_eval/README.md) from two sae_eval sweeps.

python experiments/sae_eval/organism_table.py joint=<sweep dir> text_only=<sweep dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [  # (metric key, header)
    ("image_explained_variance", "image EV"),
    ("text_explained_variance", "text EV"),
    ("image_l0", "image L0"),
    ("text_l0", "text L0"),
    ("image_frac_dead", "dead on images"),
    ("image_ce_loss_score", "CE score, image splice"),
    ("text_ce_loss_score", "CE score, text splice"),
    ("both_ce_loss_score", "CE score, both"),
    ("image_kl_div_score", "KL score, image splice"),
]


def cell(metrics: dict, key: str) -> str:
    value, null = metrics[key], metrics.get(f"{key}_null_mean")
    if key.endswith("_l0") or null is None:
        return f"{value:.3g}"
    return f"{value:.3f} ({null:.3f}, p {metrics[f'{key}_p']:.2g})"


def main(args: list[str]) -> None:
    print("| SAE | layer | " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for arg in args:
        label, sweep = arg.split("=", 1)
        results = [json.loads(p.read_text()) for p in Path(sweep).glob("*/result.json")]
        for result in sorted(results, key=lambda r: r["layer"]):
            metrics = result["metrics"]
            print(f"| {label} | {result['layer']} | " + " | ".join(cell(metrics, k) for k, _ in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
