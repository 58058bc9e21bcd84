"""The embedded data: deterministic, self-consistent across its three views, and readable by the
tools the real benchmarks use (pycocotools, cityscapesscripts, torchvision's ImageFolder)."""
import filecmp
import hashlib
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from loco_det import synthetic
from loco_det.utils import LocoError

from conftest import SYNTH_HEIGHT, SYNTH_SEED, SYNTH_TRAIN, SYNTH_VAL, SYNTH_WIDTH


def _files(root):
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(out)


def _small(out, seed, **kw):
    args = dict(n_train=3, n_val=2, height=64, width=80)
    args.update(kw)
    return synthetic.generate(str(out), seed=seed, **args)


def _instance_masks(root, split, index):
    """{instance id: mask} from the Cityscapes instanceIds png (the pixel ground truth)."""
    stem = synthetic.cityscapes_stem(index)
    path = os.path.join(root, "cityscapes", "gtFine", split, synthetic.CITY,
                        stem + "_gtFine_instanceIds.png")
    ids = np.asarray(Image.open(path)).astype(np.int64)
    return ids, {int(v): ids == v for v in np.unique(ids) if v >= 1000}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    _small(tmp_path / "a", seed=5)
    _small(tmp_path / "b", seed=5)
    _small(tmp_path / "c", seed=6)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    img = "coco/train/000000.png"
    assert not filecmp.cmp(tmp_path / "a" / img, tmp_path / "c" / img, shallow=False)
    # image i does not depend on how many images are generated
    _small(tmp_path / "d", seed=5, n_train=5)
    assert filecmp.cmp(tmp_path / "a" / img, tmp_path / "d" / img, shallow=False)


def test_layout_and_meta(synth_root):
    meta = json.loads((synth_root / "meta.json").read_text())
    assert meta["seed"] == SYNTH_SEED
    assert meta["splits"] == {"train": SYNTH_TRAIN, "val": SYNTH_VAL}
    assert (meta["height"], meta["width"]) == (SYNTH_HEIGHT, SYNTH_WIDTH)
    assert [c["name"] for c in meta["categories"]] == [c[0] for c in synthetic.CATEGORIES]
    for split, n in (("train", SYNTH_TRAIN), ("val", SYNTH_VAL)):
        assert meta["counts"][split]["images"] == n
        assert len(glob.glob(str(synth_root / "coco" / split / "*.png"))) == n
        assert len(glob.glob(str(synth_root / "imagefolder" / split / "*" / "*.png"))) == n
        cs = synth_root / "cityscapes"
        assert len(glob.glob(str(cs / "leftImg8bit" / split / "*" / "*_leftImg8bit.png"))) == n
        for suffix in ("instanceIds.png", "labelIds.png", "polygons.json"):
            assert len(glob.glob(str(cs / "gtFine" / split / "*" / f"*_gtFine_{suffix}"))) == n
        assert (synth_root / "coco" / "annotations" / f"instances_{split}.json").is_file()
    with Image.open(synth_root / "coco" / "train" / "000000.png") as im:
        assert im.size == (SYNTH_WIDTH, SYNTH_HEIGHT) and im.mode == "RGB"


def test_categories_are_evaluated_cityscapes_instance_classes():
    from cityscapesscripts.helpers.labels import id2label, name2label

    for _, cs_name, cs_id in synthetic.CATEGORIES:
        label = name2label[cs_name]
        assert label.id == cs_id and label.hasInstances and not label.ignoreInEval
    bg_name, bg_id = synthetic.BACKGROUND_LABEL
    assert id2label[bg_id].name == bg_name
    assert not id2label[bg_id].hasInstances and not id2label[bg_id].ignoreInEval


def test_coco_view_matches_pixel_ground_truth(synth_root):
    from pycocotools.coco import COCO

    meta = json.loads((synth_root / "meta.json").read_text())
    cs_id = {c["id"]: c["cityscapes_id"] for c in meta["categories"]}
    ious = []
    for split in ("train", "val"):
        coco = COCO(str(synth_root / "coco" / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == list(range(1, len(synthetic.CATEGORIES) + 1))
        n_inst = 0
        for img in coco.dataset["images"]:
            _, gt = _instance_masks(synth_root, split, img["id"] - 1)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            assert len(anns) == len(gt) >= 1
            n_inst += len(anns)
            for ann in anns:
                assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
                mask = coco.annToMask(ann).astype(bool)
                # the instance of the same class with the largest overlap
                same = [m for k, m in gt.items() if k // 1000 == cs_id[ann["category_id"]]]
                iou = max((mask & m).sum() / (mask | m).sum() for m in same)
                ious.append(iou)
                best = max(same, key=lambda m: (mask & m).sum())
                ys, xs = np.nonzero(best)
                assert ann["area"] == int(best.sum())
                assert ann["bbox"] == [int(xs.min()), int(ys.min()),
                                       int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        assert n_inst == meta["counts"][split]["instances"]
    assert min(ious) > 0.98, min(ious)
    assert np.mean(ious) > 0.995


def test_cityscapes_view_is_what_cityscapesscripts_draws(synth_root):
    """cityscapesscripts' own json -> instanceIds drawing reproduces our instanceIds png, and
    labelIds is its class map. (Its json2instanceImg() cannot save mode-I PNGs with Pillow 13,
    so the drawing function it calls is used directly.)"""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

    for split, n in (("train", 4), ("val", 2)):
        for index in range(n):
            ids, gt = _instance_masks(synth_root, split, index)
            stem = synthetic.cityscapes_stem(index)
            gt_dir = synth_root / "cityscapes" / "gtFine" / split / synthetic.CITY
            annotation = Annotation()
            annotation.fromJsonFile(str(gt_dir / f"{stem}_gtFine_polygons.json"))
            redrawn = np.asarray(createInstanceImage(annotation, "ids")).astype(np.int64)
            assert (redrawn == ids).all()
            labels = np.asarray(Image.open(gt_dir / f"{stem}_gtFine_labelIds.png")).astype(np.int64)
            assert (labels == np.where(ids >= 1000, ids // 1000, ids)).all()
            assert set(np.unique(ids[ids < 1000])) <= {synthetic.BACKGROUND_LABEL[1]}
            js = json.loads((gt_dir / f"{stem}_gtFine_polygons.json").read_text())
            assert (js["imgHeight"], js["imgWidth"]) == ids.shape
            # per-class instance numbering from 0, as in Cityscapes
            for cls in {k // 1000 for k in gt}:
                ks = sorted(k % 1000 for k in gt if k // 1000 == cls)
                assert ks == list(range(len(ks)))


def test_imagefolder_view(synth_root):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(synth_root / "imagefolder" / "train"))
    assert len(ds) == SYNTH_TRAIN
    assert set(ds.classes) <= {c[0] for c in synthetic.CATEGORIES}
    # label = category of the largest visible object, checked against the pixel ground truth
    cs_to_name = {cs_id: name for name, _, cs_id in synthetic.CATEGORIES}
    for path, target in ds.samples[:8]:
        index = int(os.path.splitext(os.path.basename(path))[0])
        _, gt = _instance_masks(synth_root, "train", index)
        largest = max(gt, key=lambda k: gt[k].sum())
        assert ds.classes[target] == cs_to_name[largest // 1000]
        same = synth_root / "coco" / "train" / os.path.basename(path)
        assert filecmp.cmp(path, same, shallow=False)


def test_objects_view_is_one_crop_per_instance(synth_root):
    """objects/<split>/<category>/<stem>_<k>.png: the square crop of instance k (COCO annotation
    order within its image), labelled by its category, cut from the scene's pixels."""
    from torchvision.datasets import ImageFolder

    meta = json.loads((synth_root / "meta.json").read_text())
    assert meta["format_version"] == synthetic.FORMAT_VERSION == 5
    assert meta["object_crop"] == synthetic.OBJECT_CROP
    for split in ("train", "val"):
        with open(synth_root / "coco" / "annotations" / f"instances_{split}.json") as f:
            coco = json.load(f)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        images = {img["id"]: img for img in coco["images"]}
        ds = ImageFolder(str(synth_root / "objects" / split))
        assert len(ds) == len(coco["annotations"])
        assert meta["counts"][split]["objects_labels"] == {
            name: sum(names[a["category_id"]] == name for a in coco["annotations"])
            for name in names.values()}
        by_image = {}
        for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
            by_image.setdefault(ann["image_id"], []).append(ann)
        for image_id, anns in list(by_image.items())[:4]:
            img = images[image_id]
            scene = np.asarray(Image.open(synth_root / "coco" / split / img["file_name"]))
            stem = os.path.splitext(img["file_name"])[0]
            for k, ann in enumerate(anns, 1):
                path = synth_root / "objects" / split / names[ann["category_id"]] / f"{stem}_{k}.png"
                crop = np.asarray(Image.open(path))
                x0, y0, x1, y1 = synthetic.object_crop(ann["bbox"], img["height"], img["width"])
                assert crop.shape[0] == crop.shape[1] == x1 - x0 == y1 - y0
                assert np.array_equal(crop, scene[y0:y1, x0:x1])


def test_object_crop_closed_cases():
    # centred, side 1.3 x the longer box side
    assert synthetic.object_crop([40, 30, 20, 10], 100, 120) == (37, 22, 63, 48)
    # small boxes are widened to min_side; crops near a border shift inside, never pad
    assert synthetic.object_crop([0, 0, 4, 4], 100, 120) == (0, 0, 16, 16)
    assert synthetic.object_crop([110, 90, 10, 10], 100, 120) == (104, 84, 120, 100)
    # never larger than the image's shorter side
    assert synthetic.object_crop([0, 0, 120, 100], 100, 120) == (10, 0, 110, 100)


def test_main_object_defines_the_imagefolder_label(synth_root):
    """Format 2: the first-painted instance (lowest COCO annotation id of its image) is the main
    object. Nothing stops the image border from cutting it, so "largest" is not guaranteed, but
    it must be the clear winner in nearly every scene: the label is rarely a near-tie."""
    clear, scenes = 0, 0
    for split in ("train", "val"):
        with open(synth_root / "coco" / "annotations" / f"instances_{split}.json") as f:
            coco = json.load(f)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        by_image = {}
        for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
            by_image.setdefault(ann["image_id"], []).append(ann)
        assert len(by_image) == len(coco["images"])
        for img in coco["images"]:
            main, *others = by_image[img["id"]]
            scenes += 1
            if all(main["area"] > 1.2 * o["area"] for o in others):
                clear += 1
                label = glob.glob(str(synth_root / "imagefolder" / split / "*" /
                                      os.path.basename(img["file_name"])))
                assert [os.path.basename(os.path.dirname(x)) for x in label] == \
                    [names[main["category_id"]]]
    assert clear >= 0.9 * scenes, (clear, scenes)


def test_centre_contour_redraws_random_masks():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for _ in range(30):
        m = ndimage.binary_opening(rng.random((24, 30)) < 0.55)
        m = synthetic._largest_component(ndimage.binary_fill_holes(m))
        if m.sum() < 3:
            continue
        canvas = Image.new("L", (30, 24), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in synthetic.trace_centre_contour(m)],
                                       fill=1, outline=1)
        assert (np.asarray(canvas, bool) == m).all()


def test_existing_output_is_never_mixed(tmp_path):
    out = tmp_path / "d"
    meta = _small(out, seed=1)
    stamp = os.stat(out / "meta.json").st_mtime_ns
    assert _small(out, seed=1) == meta  # same request: nothing rewritten
    assert os.stat(out / "meta.json").st_mtime_ns == stamp
    with pytest.raises(LocoError, match="differs in: seed"):
        _small(out, seed=2)
    assert _small(out, seed=2, overwrite=True)["seed"] == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(LocoError, match="refusing"):
            _small(foreign, seed=1, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["d", "foreign"]  # no temporary folders left


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_split", boom)
    with pytest.raises(RuntimeError):
        _small(tmp_path / "x", seed=0)
    assert os.listdir(tmp_path) == []


def test_bad_requests():
    with pytest.raises(LocoError, match="seed"):
        synthetic.request(None, 1, 1, 64, 64)
    with pytest.raises(LocoError, match="n_train"):
        synthetic.request(0, 0, 1, 64, 64)
    with pytest.raises(LocoError, match="unknown"):
        synthetic.request(0, 1, 1, 64, 64, params={"bogus": 1})
    with pytest.raises(LocoError, match="other_typical_texture_prob must be in"):
        synthetic.request(0, 1, 1, 64, 64, params={"other_typical_texture_prob": 1.5})


def _scene_hash(params=None):
    h = hashlib.sha256()
    for seed in range(6):
        img, ids, cats = synthetic.sample_scene(np.random.default_rng(seed), 64, 80, params)
        h.update(img.tobytes())
        h.update(ids.tobytes())
        h.update(bytes(cats))
    return h.hexdigest()


def test_default_scenes_are_format_4s_and_typical_surfaces_reach_every_instance(monkeypatch):
    """Format 5 added other_typical_texture_prob; at its default (0) the scenes are format 4's,
    byte for byte (the hash was computed with format 4's generator, commit 439007c). At 1 every
    instance, not only the main one, is filled with its category's typical surface."""
    assert _scene_hash() == "5599d86ecc90a798f91be4258fca6596565b557b2cc3190ac4dae5acc8b3bb34"
    assert _scene_hash({"other_typical_texture_prob": 0.8}) != _scene_hash()
    kinds = []
    texture = synthetic._texture

    def record(rng, h, w, kind=None):
        kinds.append(kind)
        return texture(rng, h, w, kind)

    monkeypatch.setattr(synthetic, "_texture", record)
    for p in (0.0, 1.0):
        kinds.clear()
        params = {"other_typical_texture_prob": p, "main_typical_texture_prob": p,
                  "min_objects": 4, "max_objects": 4}
        synthetic.sample_scene(np.random.default_rng(0), 96, 128, params)
        # the background's two layers first (a gradient, then a random kind), then one
        # surface per shape attempted
        objects = kinds[2:]
        assert len(objects) == 4
        typical = set(synthetic.TYPICAL_TEXTURE.values())
        assert all(k in typical for k in objects) if p else all(k is None for k in objects)


def test_cli(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_synthetic_data.py")
    spec = importlib.util.spec_from_file_location("make_synthetic_data", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "s")
    args = ["--out", out, "--num-train", "2", "--num-val", "1", "--size", "64x80", "--no-progress"]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "already up to date" in capsys.readouterr().out
    assert cli.main(args + ["--seed", "3"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    typical = ["--out", str(tmp_path / "t")] + args[2:] + ["--typical-surfaces", "0.8"]
    assert cli.main(typical) == 0
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["params"]["other_typical_texture_prob"] == 0.8
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["params"][
        "other_typical_texture_prob"] == 0.0
    with pytest.raises(SystemExit):
        cli.main(["--size", "64"])


def test_generator_removes_folders_left_by_a_killed_run(tmp_path):
    """A generator run killed with SIGKILL leaves its `.tmp_*` folder (and, while replacing a
    dataset, the old one); the next run removes those of dead processes, not a live writer's."""
    from loco_det.utils import temp_prefix

    out = tmp_path / "loco_synth"
    dead_pid = 2 ** 22 + 1  # above Linux's pid_max: no such process
    stale = [tmp_path / (temp_prefix(str(out), pid=dead_pid) + "abc"),
             tmp_path / (temp_prefix(str(out) + "_old", pid=dead_pid) + "def")]
    live = tmp_path / (temp_prefix(str(out), pid=os.getppid()) + "ghi")
    for d in stale + [live]:
        (d / "coco").mkdir(parents=True)
        (d / "coco" / "half.png").write_bytes(b"x")
    synthetic.generate(str(out), seed=0, n_train=2, n_val=1, height=32, width=40)
    assert not any(d.exists() for d in stale)
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["loco_synth", live.name])
    # a run that finds the dataset up to date (a resumed grid) sweeps them too
    (stale[0] / "coco").mkdir(parents=True)
    synthetic.generate(str(out), seed=0, n_train=2, n_val=1, height=32, width=40)
    assert not stale[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["loco_synth", live.name])


def test_generator_stopped_by_sigterm_removes_its_temporary_folder(tmp_path):
    """SIGTERM is how a grid runner stops its jobs: the folder being written goes with it."""
    import signal
    import subprocess
    import sys
    import time

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "make_synthetic_data.py")
    out = tmp_path / "loco_synth"
    proc = subprocess.Popen([sys.executable, tool, "--out", str(out), "--num-train", "5000",
                             "--num-val", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".tmp_*/**/*.png")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
