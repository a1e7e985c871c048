"""Concept datasets: the three sources, their content hash, and their errors."""

from __future__ import annotations

import pytest
from PIL import Image

from xmodal.data.builtin import builtin_concept_table, builtin_concepts
from xmodal.data.image_folder import image_folder
from xmodal.data.synthetic import synthetic_shapes
from xmodal.errors import DatasetError


def make_folder(root, concepts=("cat", "dog"), per_concept=2):
    for i, concept in enumerate(concepts):
        (root / concept).mkdir(parents=True)
        for j in range(per_concept):
            Image.new("RGB", (20, 20), (40 * i, 30 * j, 100)).save(root / concept / f"{j}.png")
    return root


def test_synthetic_is_seeded_and_paired():
    a, b, c = synthetic_shapes(seed=1), synthetic_shapes(seed=1), synthetic_shapes(seed=2)
    assert a.content_hash() == b.content_hash() != c.content_hash()
    assert len(a.concepts) == 12 and len(a.images) == 36
    for concept in a.concepts:
        assert a.concept(concept.partner).category == concept.category  # same shape, confusable colour


def test_image_folder_with_concepts_csv(tmp_path):
    root = make_folder(tmp_path / "photos")
    (root / "concepts.csv").write_text("concept,category,text,partner\ncat,animals,a cat,dog\ndog,animals,a dog,cat\n")
    data = image_folder("photos", str(root))
    assert [c.text for c in data.concepts] == ["a cat", "a dog"]
    assert data.concept("cat").partner == "dog"
    assert len(data.images) == 4 and data.images[0].load().size == (20, 20)


def test_a_partner_naming_no_concept_is_an_error_that_names_it(tmp_path):
    root = make_folder(tmp_path / "photos")
    (root / "concepts.csv").write_text("concept,category,text,partner\ncat,animals,a cat,dgo\ndog,animals,a dog,cat\n")
    with pytest.raises(DatasetError, match="concept 'cat' names partner 'dgo', which is not a concept"):
        image_folder("photos", str(root))


def test_image_folder_without_csv_uses_folder_names(tmp_path):
    data = image_folder("photos", str(make_folder(tmp_path / "p", ("red_apple", "pear"))))
    assert [c.text for c in data.concepts] == ["pear", "red apple"]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        image_folder("x", str(tmp_path / "nowhere"))


def test_concept_folder_without_images(tmp_path):
    root = make_folder(tmp_path / "p")
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("no pictures")
    with pytest.raises(DatasetError, match=r"bird.*holds no image"):
        image_folder("x", str(root))


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path / "p")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg.*cannot be read"):
        image_folder("x", str(root))


def test_content_hash_sees_image_bytes(tmp_path):
    root = make_folder(tmp_path / "p")
    before = image_folder("x", str(root)).content_hash()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(root / "cat" / "0.png")
    assert image_folder("x", str(root)).content_hash() != before


def test_builtin_list_has_the_plans_five_categories_with_partners():
    table = builtin_concept_table()
    assert table.groupby("category").size().to_dict() == {"abstract": 10, "animals": 20, "landmarks": 20, "objects": 20, "scenes": 22}
    by_name = table.set_index("concept")
    for concept, row in by_name.iterrows():
        assert row["partner"] in by_name.index, concept
        assert by_name.loc[row["partner"], "category"] == row["category"]


def test_builtin_uses_the_photos_it_finds(tmp_path):
    root = make_folder(tmp_path / "photos", ("cat", "dog", "eiffel_tower"))
    data = builtin_concepts(image_root=str(root), categories=["animals", "landmarks"])
    assert [c.name for c in data.concepts] == ["eiffel_tower", "cat", "dog"]
    assert data.concept("eiffel_tower").partner is None  # tokyo_tower has no photos here
    with pytest.raises(DatasetError, match="needs photos"):
        builtin_concepts()


def write_local_hub_dataset(root, n_per_class: int = 3):
    """A CIFAR-like dataset in the layout `datasets.load_dataset(<dir>)` reads offline."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    labels = [0, 1, 2] * n_per_class
    features = Features(
        {"img": ImageFeature(), "fine_label": ClassLabel(names=["apple", "pear", "bus"]), "coarse_label": ClassLabel(names=["fruit", "vehicle"])}
    )
    rows = {
        "img": [Image.new("RGB", (8, 8), (40 * label, 10, 10)) for label in labels],
        "fine_label": labels,
        "coarse_label": [0 if label < 2 else 1 for label in labels],
    }
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))


def test_hub_classification_dataset_reads_classes_categories_and_partners(tmp_path):
    from xmodal.data.hub_datasets import hub_concepts

    write_local_hub_dataset(tmp_path)
    dataset = hub_concepts(
        "local", str(tmp_path), split="test", image_column="img", label_column="fine_label", category_column="coarse_label", max_images_per_concept=2
    )
    by_name = {c.name: c for c in dataset.concepts}
    assert set(by_name) == {"apple", "pear", "bus"}
    assert by_name["apple"].category == "fruit" and by_name["apple"].partner == "pear" and by_name["bus"].partner is None
    assert len(dataset.images) == 6


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    from xmodal.data.hub_datasets import hub_concepts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetError, match="could not load hub dataset 'xmodal-test/does-not-exist'.*To fix"):
        hub_concepts("missing", "xmodal-test/does-not-exist", label_column="label")


def make_coco(root, per_label: int = 4):
    """A COCO 2017 layout in miniature: animals drawn red, vehicles blue, one food image, captions."""
    import json

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    categories = [
        {"id": 1, "name": "dog", "supercategory": "animal"},
        {"id": 2, "name": "car", "supercategory": "vehicle"},
        {"id": 3, "name": "pizza", "supercategory": "food"},
    ]
    images, objects, captions = [], [], []
    plan = [("animal", 1, (200, 40, 40))] * per_label + [("vehicle", 2, (40, 40, 200))] * per_label + [("food", 3, (40, 200, 40))]
    for image_id, (label, category, colour) in enumerate(plan, start=1):
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (48, 48), colour).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name})
        objects.append({"id": 10 * image_id, "image_id": image_id, "category_id": category, "area": 900.0})
        objects.append({"id": 10 * image_id + 1, "image_id": image_id, "category_id": 3, "area": 10.0})  # a small pizza everywhere
        captions.append({"id": 2 * image_id + 1, "image_id": image_id, "caption": "a second caption"})
        captions.append({"id": 2 * image_id, "image_id": image_id, "caption": f"a {label} " + "word " * 80})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": images, "annotations": objects, "categories": categories}))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return root


def test_coco_images_take_the_supercategory_of_their_largest_object(tmp_path):
    from xmodal.data.coco import coco_supercategories

    root = make_coco(tmp_path / "coco")
    dataset = coco_supercategories("coco", str(root), supercategories=["animal", "vehicle"], images_per_category=3, seed=0)
    assert [c.category for c in dataset.concepts] == ["animal"] * 3 + ["vehicle"] * 3  # the small pizza never wins
    assert all(len(c.text.split()) == 64 and c.text.startswith(("a animal", "a vehicle")) for c in dataset.concepts)  # first caption, cut
    assert dataset.images[0].load().getpixel((5, 5))[0] > 150 and len(dataset.images) == 6
    again = coco_supercategories("coco", str(root), supercategories=["animal", "vehicle"], images_per_category=3, seed=0)
    assert [c.name for c in again.concepts] == [c.name for c in dataset.concepts]  # seeded
    with pytest.raises(DatasetError, match=r"\['kitchen'\], not COCO supercategories; pick from \['animal', 'food', 'vehicle'\]"):
        coco_supercategories("coco", str(root), supercategories=["kitchen"])
    with pytest.raises(DatasetError, match=r"fewer than dataset.images_per_category=5 .* of \{'animal': 4, 'vehicle': 4\}"):
        coco_supercategories("coco", str(root), supercategories=["animal", "vehicle"], images_per_category=5)
    with pytest.raises(DatasetError, match="instances_train2017.json' is missing"):
        coco_supercategories("coco", str(root), split="train2017")
