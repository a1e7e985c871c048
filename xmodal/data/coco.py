"""COCO images and captions labelled by supercategory (seed 001's category probes), from the files on disk.

The layout is COCO 2017's own: ``<root>/<split>/<file_name>.jpg`` and
``<root>/annotations/{instances,captions}_<split>.json``. Each image is labelled with the
supercategory of its largest object (animal, vehicle, food, indoor, ...); images whose
largest object is of another supercategory are left out. A balanced, seeded sample of
`images_per_category` images per supercategory is kept. Every image is its own concept, its
text its first caption cut at `max_caption_words` words (seed 001 cuts at 64 tokens; a word
count keeps the cut independent of the model's tokenizer), and its category the
supercategory, so `experiment=probe experiment.label=category` reads supercategories from
captions and from images.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from xmodal.data.concepts import Concept, ConceptDataset, read_image_file
from xmodal.errors import DatasetError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"COCO annotation file {str(path)!r} is missing; dataset.root needs annotations/ beside the image folder")
    return json.loads(path.read_text())


def coco_supercategories(
    name: str,
    root: str,
    split: str = "val2017",
    supercategories: list[str] | None = None,
    images_per_category: int = 50,
    max_caption_words: int = 64,
    seed: int = 0,
) -> ConceptDataset:
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"dataset.root {root!r} does not exist or is not a folder; point it at COCO 2017 ({split}/ and annotations/)")
    instances = _read_json(root_path / "annotations" / f"instances_{split}.json")
    captions = _read_json(root_path / "annotations" / f"captions_{split}.json")
    supercategory_of = {c["id"]: c["supercategory"] for c in instances["categories"]}
    known = sorted(set(supercategory_of.values()))
    wanted = list(supercategories) if supercategories else known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise DatasetError(f"dataset.supercategories has {unknown}, not COCO supercategories; pick from {known}")

    largest: dict[int, tuple[float, str]] = {}  # image id -> (area, supercategory) of its largest object
    for ann in instances["annotations"]:
        label = supercategory_of[ann["category_id"]]
        if ann["area"] > largest.get(ann["image_id"], (-1.0, ""))[0]:
            largest[ann["image_id"]] = (ann["area"], label)
    first_caption: dict[int, str] = {}
    for ann in sorted(captions["annotations"], key=lambda a: a["id"]):
        first_caption.setdefault(ann["image_id"], ann["caption"].strip())
    files = {img["id"]: img["file_name"] for img in instances["images"]}

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for image_id, (_, label) in sorted(largest.items()):
        if label in wanted and image_id in first_caption:
            by_label[label].append(image_id)
    short = {label: len(by_label[label]) for label in wanted if len(by_label[label]) < images_per_category}
    if short:
        raise DatasetError(
            f"COCO {split} has fewer than dataset.images_per_category={images_per_category} captioned images whose largest "
            f"object is of {short}; lower images_per_category"
        )
    concepts, images = [], []
    for label in wanted:
        for image_id in sorted(rng.choice(by_label[label], size=images_per_category, replace=False).tolist()):
            concept = f"coco_{image_id}"
            caption = " ".join(first_caption[image_id].split()[:max_caption_words])
            concepts.append(Concept(concept, caption, label))
            images.append(read_image_file(root_path / split / files[image_id], concept))
    return ConceptDataset(name, concepts, images)
