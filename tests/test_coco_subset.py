"""COCO-10K/1K-style subsets: reproducible from (size, seed), written atomically, named so that
loco_det registers them."""
import importlib.util
import json
import os

import pytest

from loco_det import coco_subset
from loco_det.utils import LocoError


def _coco(n=50):
    images = [{"id": 1000 + 7 * i, "file_name": f"{1000 + 7 * i:012d}.jpg", "height": 10,
               "width": 10} for i in range(n)]
    anns = [{"id": k + 1, "image_id": images[k % n]["id"], "category_id": 1, "bbox": [0, 0, 1, 1],
             "area": 1, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]} for k in range(3 * n)]
    return {"info": {"year": 2017}, "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person"}]}


def test_same_seed_same_images_other_seed_other_images():
    coco = _coco()
    a = coco_subset.make_subset(coco, 10, seed=1)
    b = coco_subset.make_subset(coco, 10, seed=1)
    c = coco_subset.make_subset(coco, 10, seed=2)
    ids = [im["id"] for im in a["images"]]
    assert ids == [im["id"] for im in b["images"]]
    assert ids != [im["id"] for im in c["images"]]
    assert len(set(ids)) == 10
    # the order of the source file does not matter
    shuffled = dict(coco, images=coco["images"][::-1])
    assert [im["id"] for im in coco_subset.make_subset(shuffled, 10, 1)["images"]] == ids
    # only the chosen images' annotations, other keys kept
    assert {x["image_id"] for x in a["annotations"]} == set(ids)
    assert len(a["annotations"]) == 30
    assert a["categories"] == coco["categories"]
    assert a["info"]["loco_det_subset"] == {"size": 10, "seed": 1}


def test_selection_is_pinned():
    """The selection rule is part of the data's identity: changing it silently would change
    every published split. (numpy's default_rng(seed).choice over the sorted ids.)"""
    assert coco_subset.select_image_ids(range(100), 5, 0) == [26, 30, 50, 61, 81]


def test_bad_sizes():
    with pytest.raises(LocoError, match="larger"):
        coco_subset.make_subset(_coco(5), 6, 0)
    with pytest.raises(LocoError, match="positive"):
        coco_subset.make_subset(_coco(5), 0, 0)
    with pytest.raises(LocoError, match="not a COCO"):
        coco_subset.make_subset({"images": []}, 1, 0)


def test_names():
    assert coco_subset.size_label(10000) == "10k"
    assert coco_subset.size_label(1000) == "1k"
    assert coco_subset.size_label(500) == "500"
    assert coco_subset.subset_dataset_name(10000, 3) == "coco_2017_train_10k_seed3"
    name = coco_subset.subset_filename(1000, 2)
    assert name == "instances_train2017_1000_seed2.json"
    assert coco_subset.SUBSET_FILE_RE.match(name).groups() == ("1000", "2")


def test_cli_writes_next_to_source_and_names_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    tmp_path = tmp_path / "datasets" / "coco" / "annotations"  # where register_all looks
    tmp_path.mkdir(parents=True)
    src = tmp_path / "instances_train2017.json"
    src.write_text(json.dumps(_coco()))
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_coco_subset.py")
    spec = importlib.util.spec_from_file_location("make_coco_subset", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--size", "4", "--seed", "9", "--src", str(src)]) == 0
    out = tmp_path / "instances_train2017_4_seed9.json"
    assert "coco_2017_train_4_seed9" in capsys.readouterr().out
    first = out.read_bytes()
    assert cli.main(["--size", "4", "--seed", "9", "--src", str(src)]) == 0
    assert out.read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["instances_train2017.json", out.name]  # no temp files
    missing = tmp_path / "nope.json"
    assert cli.main(["--size", "4", "--seed", "9", "--src", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{truncated")
    assert cli.main(["--size", "4", "--seed", "9", "--src", str(bad), "--out",
                     str(tmp_path / "o.json")]) == 1
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
    # elsewhere the file is written, but no dataset name that will never be registered is printed
    assert cli.main(["--size", "4", "--seed", "9", "--src", str(src), "--out",
                     str(tmp_path.parent / "o.json")]) == 0
    said = capsys.readouterr().out
    assert "not registered" in said and "coco_2017_train_4_seed9" not in said
