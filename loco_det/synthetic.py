"""Embedded data: deterministic scenes of textured shapes with exact instance masks.

Why it exists: the LoCo pipeline (pretrain -> readout -> Mask R-CNN) must run end to end, and be
tested, on a 2-core CPU without ImageNet, COCO or Cityscapes. These scenes give a task that is
learnable in minutes yet not trivial (textured objects on textured clutter, occlusion, varied
scale and colour), written in the three layouts the real benchmarks use, so the same code paths
(torchvision's ImageFolder, Detectron2's COCO loader and evaluator, Detectron2's own Cityscapes
loader and the official `cityscapesscripts` evaluation) run on it unchanged. See docs/formats.md.

Ground truth is defined by pixels: every shape is rasterised into an instance map in paint order,
so the visible mask of an instance is what later instances leave of it. Annotations are derived
from those visible masks:

- Cityscapes polygons trace the centres of the boundary pixels (Cityscapes' own convention:
  `PIL.ImageDraw.polygon` of them, as `cityscapesscripts` does, redraws the mask exactly);
- COCO polygons follow the pixel edges (the outline of the union of pixel squares), which is what
  COCO's continuous coordinates mean.

A placement that would leave any instance with a tiny, thin, split or holed visible mask is
re-drawn (or the shape dropped after a few tries): polygons cannot express holes or split
instances consistently across the three formats, and slivers teach the detector nothing.

Determinism: each image is drawn from its own `numpy.random.SeedSequence([seed, split, index])`,
so the same seed gives bit-identical files, and image i does not depend on how many images are
generated.
"""
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from .utils import LocoError, atomic_write, remove_stale_temps, temp_prefix

GENERATOR = "loco_det.synthetic"
# 2: a main object per scene; 3: + VOC view and labelTrainIds; 4: + objects; 5: + the parameter
# other_typical_texture_prob (its default, 0, draws format 4's scenes exactly)
FORMAT_VERSION = 5
# Object-centric ImageFolder view ("objects/"): one square crop per instance, as ImageNet photos
# are centred on one object. The scene view's label is learnable only through the main object's
# typical surface; an object crop's label is its shape (other instances wear random surfaces),
# which is what a detector has to recognise.
OBJECT_CROP = {"context": 1.3,   # crop side = context * longer side of the instance's box
               "min_side": 16}   # px; smaller crops are widened to this (within the image)

# (shape, Cityscapes label name, Cityscapes label id). Ids are those of
# cityscapesscripts.helpers.labels (checked by the tests); only classes that have instances and
# are evaluated (not caravan/trailer, which are ignoreInEval) are used.
CATEGORIES = (
    ("ellipse", "person", 24),
    ("triangle", "rider", 25),
    ("rectangle", "car", 26),
    ("cross", "truck", 27),
    ("star", "bus", 28),
    ("crescent", "train", 31),
)
# Background pixels carry a plain, evaluated, non-instance label. Not a void label: the
# Cityscapes instance evaluation ignores predictions that fall on void pixels, which would hide
# false positives on the background.
BACKGROUND_LABEL = ("road", 7)
# Cityscapes label id -> train id (19-class semantic segmentation, 255 = ignore) of the labels
# above, as `cityscapesscripts.helpers.labels` defines them (checked by the tests): what its own
# createTrainIdLabelImgs tool writes into *_gtFine_labelTrainIds.png.
CITYSCAPES_TRAIN_IDS = {7: 0, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16}
# PASCAL VOC view: one VOC<year> folder holding both splits (ImageSets/Main/{train,val}.txt).
# 2007 makes Detectron2's PascalVOCDetectionEvaluator use the VOC07 11-point AP, as on
# voc_2007_test.
VOC_YEAR = 2007
# Typical surface of a main object per category (see DEFAULT_PARAMS); two kinds are shared, so
# the surface alone never tells the category.
TYPICAL_TEXTURE = {"ellipse": "noise", "triangle": "stripes", "rectangle": "checker",
                   "cross": "gradient", "star": "stripes", "crescent": "checker"}
CITY = "shapes"
_SPLIT_INDEX = {"train": 0, "val": 1}

DEFAULT_PARAMS = {
    "min_objects": 2,
    "max_objects": 6,
    "min_radius_frac": 0.07,   # shape radius range as a fraction of min(height, width)
    "max_radius_frac": 0.18,
    "min_area_frac": 0.0025,   # smallest visible mask as a fraction of the image area
    "min_visible_frac": 0.3,   # an occluded instance keeps at least this share of its shape
    "max_tries": 20,
    # The first shape is the scene's main object, as a photo has a subject: larger than the
    # rest, near the centre, mostly visible, and usually wearing its category's typical surface
    # (TYPICAL_TEXTURE), as real categories have a typical look. This makes the ImageFolder
    # label (category of the largest visible object) something features can express. Format 1
    # drew all shapes alike: its label was a near-tie between similar shapes on similar
    # textures, and every encoder's readout stayed at chance. A larger main object alone was
    # not enough: a ResNet-18 trained on those labels from scratch memorised 3000 scenes and
    # stayed at chance on validation; the typical surface is what makes the label learnable.
    "main_radius_frac": [0.3, 0.42],  # a list, not a tuple: meta.json must read back equal
    "main_centre_frac": 0.3,          # main object's centre within [f, 1 - f] of each side
    "main_min_visible_frac": 0.7,     # later shapes may hide at most 30% of it
    "main_typical_texture_prob": 0.8,
    # The other instances' chance of wearing their category's typical surface. At 0 every one
    # wears a random surface, so an object crop's label shows only in its shape, and instance
    # discrimination is solved by the surface alone: contrastive pretraining on the crops then
    # learns features that read out the shape barely better than random init does. At 0.8 the
    # surface carries the category too, as in photos (docs/learning.md, "Embedded data").
    "other_typical_texture_prob": 0.0,
}


def categories():
    """Category records as written to meta.json and COCO (ids 1..K)."""
    return [{"id": i + 1, "name": shape, "cityscapes_name": cs_name, "cityscapes_id": cs_id}
            for i, (shape, cs_name, cs_id) in enumerate(CATEGORIES)]


def voc_id(split, index):
    """VOC file id: both splits share JPEGImages/ and Annotations/, so the split is in the id."""
    return f"{split}_{index:06d}"


def voc_annotation(file_id, height, width, insts, cats):
    """PASCAL VOC XML: 1-based inclusive pixel boxes (VOC's convention; Detectron2's loader
    subtracts 1 from xmin/ymin), truncated = the visible mask touches the image border."""
    objects = []
    for inst in insts:
        x, y, w, h = inst["bbox"]
        truncated = int(x == 0 or y == 0 or x + w == width or y + h == height)
        objects.append(
            f"  <object>\n    <name>{cats[inst['category']]['name']}</name>\n"
            f"    <pose>Unspecified</pose>\n    <truncated>{truncated}</truncated>\n"
            f"    <difficult>0</difficult>\n    <bndbox>\n      <xmin>{x + 1}</xmin>\n"
            f"      <ymin>{y + 1}</ymin>\n      <xmax>{x + w}</xmax>\n"
            f"      <ymax>{y + h}</ymax>\n    </bndbox>\n  </object>\n")
    return (f"<annotation>\n  <folder>VOC{VOC_YEAR}</folder>\n"
            f"  <filename>{file_id}.jpg</filename>\n  <size>\n    <width>{width}</width>\n"
            f"    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <segmented>0</segmented>\n" + "".join(objects) + "</annotation>\n")


def image_stem(index):
    return f"{index:06d}"


def cityscapes_stem(index):
    """`<city>_<seq>_<frame>`, the only name shape cityscapesscripts can parse."""
    return f"{CITY}_000000_{index:06d}"


# ---------------------------------------------------------------------------------------------
# Shapes and textures
# ---------------------------------------------------------------------------------------------

def _regular(cx, cy, radii, angles):
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


# Radius multipliers that give every shape about the same area at the same nominal size, so
# that no category wins "largest object" (the ImageFolder label) just by being fat.
_AREA_SCALE = {"ellipse": 1.0, "triangle": 1.24, "rectangle": 0.97, "cross": 1.0, "star": 1.25,
               "crescent": 1.35}


def _shape_polygon(rng, kind, cx, cy, s):
    """Vertices (x, y) of one shape of category `kind`, radius about `s`, random pose."""
    theta = rng.uniform(0, 2 * np.pi)
    s = s * _AREA_SCALE[kind]
    if kind == "ellipse":
        aspect = rng.uniform(0.55, 1.0)
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x, y = s * np.cos(t), s * aspect * np.sin(t)
    elif kind == "triangle":
        t = theta + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        return _regular(cx, cy, [s * 1.1] * 3, t)
    elif kind == "rectangle":
        aspect = rng.uniform(0.45, 0.85)
        x = np.array([-1, 1, 1, -1]) * s
        y = np.array([-1, -1, 1, 1]) * s * aspect
    elif kind == "cross":
        w = s * rng.uniform(0.32, 0.42)
        x = np.array([-w, w, w, s, s, w, w, -w, -w, -s, -s, -w])
        y = np.array([-s, -s, -w, -w, w, w, s, s, w, w, -w, -w])
    elif kind == "star":
        n = 5
        t = theta + np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, s * 1.1, s * rng.uniform(0.42, 0.52))
        return _regular(cx, cy, radii, t)
    elif kind == "crescent":
        # Outer arc of a circle, inner arc of an offset circle of the same radius: a lune.
        t_out = np.linspace(-0.8 * np.pi, 0.8 * np.pi, 28)
        outer = np.stack([s * np.cos(t_out), s * np.sin(t_out)], 1)
        off = s * rng.uniform(0.55, 0.75)
        # the inner circle (centre (-off, 0), radius s) meets the outer one where x = -off / 2
        half = np.arccos(np.clip((-off / 2 + off) / s, -1, 1))
        t_in = np.linspace(half, -half, 20)[1:-1]
        inner = np.stack([-off + s * np.cos(t_in), s * np.sin(t_in)], 1)
        # close the lune through the intersection points
        top = np.array([[-off / 2, s * np.sin(np.arccos(-off / 2 / s))]])
        pts = np.concatenate([outer, top, inner, top * [1, -1]])
        x, y = pts[:, 0], pts[:, 1]
    else:
        raise ValueError(kind)
    c, si = np.cos(theta), np.sin(theta)
    return [(cx + c * xi - si * yi, cy + si * xi + c * yi) for xi, yi in zip(x, y)]


def _random_colour(rng):
    return rng.uniform(0.0, 1.0, 3).astype(np.float32)


def _lowfreq(rng, h, w, cell):
    """Smooth noise: a coarse random grid bilinearly upsampled (cheap, deterministic)."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) / cell
    xs = np.arange(w, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def _texture(rng, h, w, kind=None):
    """An HxWx3 float texture in [0, 1]: the fill of an object or a layer of background."""
    kinds = ("noise", "stripes", "checker", "gradient")
    kind = kind or kinds[rng.integers(len(kinds))]
    c1, c2 = _random_colour(rng), _random_colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "noise":
        t = _lowfreq(rng, h, w, int(rng.integers(3, 12)))
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(4, 14)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period
                               + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    elif kind == "checker":
        k = int(rng.integers(3, 10))
        t = ((xx // k + yy // k) % 2).astype(np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        raise ValueError(kind)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _background(rng, h, w):
    """Two blended texture layers plus clutter lines: edges and texture that are not objects."""
    base = _texture(rng, h, w, "gradient")
    layer = _texture(rng, h, w)
    alpha = rng.uniform(0.2, 0.6)
    img = base * (1 - alpha) + layer * alpha
    clutter = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(0, 6))):
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
        draw.line(pts, fill=255, width=int(rng.integers(1, 4)))
    m = np.asarray(clutter, dtype=np.float32)[..., None] / 255.0
    return img * (1 - m) + _random_colour(rng) * m


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------

def _mask_ok(mask, min_area):
    """Whether a visible mask can be annotated faithfully in all three formats."""
    from scipy import ndimage  # deferred: `import loco_det` should not pay for scipy

    area = int(mask.sum())
    if area < min_area:
        return False
    rs, cs = _bbox_slices(mask)
    mask = np.pad(mask[rs, cs], 1)  # same answers on the padded crop, much cheaper
    # thin remnants (e.g. a 2-pixel sliver along an occluder) carry no shape information
    if int(ndimage.binary_erosion(mask).sum()) < 0.2 * area:
        return False
    _, n = ndimage.label(mask)  # 4-connectivity: one piece, no diagonal-only joints
    if n != 1:
        return False
    # no holes, even ones closed only diagonally (polygons cannot express them)
    filled = ndimage.binary_fill_holes(mask)  # 4-connected background: a diagonal gap closes
    return bool((filled == mask).all())


def _largest_component(mask):
    """Sharp tips rasterise to pixels joined only diagonally; dropping them keeps every instance
    one 4-connected piece (the rasterised pixels, not the ideal polygon, are the ground truth)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == 1 + int(np.argmax(sizes))


def _bbox_slices(mask):
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def object_crop(bbox, height, width, context=OBJECT_CROP["context"],
                min_side=OBJECT_CROP["min_side"]):
    """(x0, y0, x1, y1) of the square crop around a COCO box [x, y, w, h]: centred on the box,
    side context * max(w, h) (at least min_side, at most the image's shorter side), shifted to
    lie inside the image rather than padded (padding would be a cue no real photo has)."""
    x, y, w, h = bbox
    side = int(round(min(max(context * max(w, h), min_side), height, width)))
    cx, cy = x + w / 2.0, y + h / 2.0
    x0 = int(round(min(max(cx - side / 2.0, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2.0, 0), height - side)))
    return x0, y0, x0 + side, y0 + side


def sample_scene(rng, height, width, params=None):
    """Draw one scene: returns (image uint8 HxWx3, id map uint8 HxW with 0 = background and
    k = k-th surviving instance, list of category indices 0..K-1 of instances 1..n)."""
    p = dict(DEFAULT_PARAMS, **(params or {}))
    h, w = height, width
    img = _background(rng, h, w)
    ids = np.zeros((h, w), np.int32)  # provisional ids: 1 + index into `placed`
    full_area = {}
    placed = []  # category index per provisional id
    short = min(h, w)
    min_area = max(12, int(round(p["min_area_frac"] * h * w)))
    n_obj = int(rng.integers(p["min_objects"], p["max_objects"] + 1))
    for _ in range(n_obj):
        cat = int(rng.integers(len(CATEGORIES)))
        main = not placed
        if main:
            typical = rng.random() < p["main_typical_texture_prob"]
        else:  # no draw at 0, so scenes of the default parameters are unchanged
            typical = p["other_typical_texture_prob"] > 0 and \
                rng.random() < p["other_typical_texture_prob"]
        texture = _texture(rng, h, w, TYPICAL_TEXTURE[CATEGORIES[cat][0]] if typical else None)
        lo, hi = p["main_radius_frac"] if main else (p["min_radius_frac"], p["max_radius_frac"])
        margin = p["main_centre_frac"] if main else 0.05
        # the main object lands on an empty canvas and virtually always fits; insisting on it
        # guarantees every scene has an object (the ImageFolder label needs one)
        for _try in range(p["max_tries"] * (50 if main else 1)):
            s = float(np.exp(rng.uniform(np.log(lo * short), np.log(hi * short))))
            cx = float(rng.uniform(margin * w, (1 - margin) * w))
            cy = float(rng.uniform(margin * h, (1 - margin) * h))
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon(_shape_polygon(rng, CATEGORIES[cat][0], cx, cy, s),
                                           fill=1)
            shape = _largest_component(np.asarray(canvas, dtype=bool))
            if not _mask_ok(shape, min_area):
                continue
            new_id = len(placed) + 1
            trial = np.where(shape, new_id, ids)
            # only instances under the new shape can have changed
            ok = True
            for other in np.unique(ids[shape]):
                if other == 0:
                    continue
                vis = trial == other
                keep = p["main_min_visible_frac"] if other == 1 else p["min_visible_frac"]  # 1: main
                if vis.sum() < keep * full_area[other] or not _mask_ok(vis, min_area):
                    ok = False
                    break
            if not ok:
                continue
            ids = trial
            full_area[new_id] = int(shape.sum())
            placed.append(cat)
            img = np.where(shape[..., None], texture * rng.uniform(0.85, 1.0), img)
            break
    # pixel noise, then quantise
    img = img + rng.normal(0, rng.uniform(0.01, 0.05), img.shape).astype(np.float32)
    image = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    # renumber 1..n in paint order (every placed shape survived: placements were checked)
    present = [i for i in range(1, len(placed) + 1) if (ids == i).any()]
    remap = np.zeros(len(placed) + 1, np.uint8)
    for k, i in enumerate(present, 1):
        remap[i] = k
    return image, remap[ids], [placed[i - 1] for i in present]


# ---------------------------------------------------------------------------------------------
# Mask -> polygons
# ---------------------------------------------------------------------------------------------

# 8 neighbours (drow, dcol), clockwise on screen (rows grow downwards), starting north
_NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def trace_centre_contour(mask):
    """Outer boundary of a single-component mask as pixel-centre points [(x, y), ...], in order
    (Moore-neighbour tracing). Filling this polygon with PIL, outline included, as Cityscapes
    does, redraws a hole-free mask exactly. Collinear points are dropped."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("empty mask")
    rs, cs = _bbox_slices(mask)
    crop = np.pad(mask[rs, cs], 1)
    start_r, start_c = np.argwhere(crop)[0]  # topmost, then leftmost: its W, NW, N, NE are empty
    state = (int(start_r), int(start_c), 6)  # (row, col, direction of the background 'backtrack')
    seen = {}
    points = []
    while state not in seen:
        seen[state] = len(points)
        r, c, b = state
        points.append((r, c))
        for step in range(1, 8):
            d = (b + step) % 8
            dr, dc = _NEIGHBOURS[d]
            if crop[r + dr, c + dc]:
                pr, pc = _NEIGHBOURS[(d - 1) % 8]
                br, bc = r + pr - (r + dr), c + pc - (c + dc)  # backtrack relative to the new pixel
                state = (r + dr, c + dc, _NEIGHBOURS.index((br, bc)))
                break
        else:  # isolated pixel
            break
    points = points[seen[state]:]  # the cycle (the start state is on it; kept general)
    off_r, off_c = rs.start - 1, cs.start - 1
    pts = [(c + off_c, r + off_r) for r, c in points]
    return _drop_collinear(pts)


def _drop_collinear(pts):
    """Remove vertices where the path continues straight on (keeps reversals: thin spikes)."""
    if len(pts) < 3:
        return pts
    out = []
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i - 1]
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % n]
        d1, d2 = (x1 - x0, y1 - y0), (x2 - x1, y2 - y1)
        straight = d1[0] * d2[1] - d1[1] * d2[0] == 0 and d1[0] * d2[0] + d1[1] * d2[1] > 0
        if not straight:
            out.append(pts[i])
    return out or pts[:1]


def pixel_edge_polygons(mask):
    """Outline of the union of the mask's pixel squares, in COCO's continuous coordinates (pixel
    (x, y) covers [x, x+1] x [y, y+1]): a list of flat [x0, y0, x1, y1, ...] lists, one per
    outer ring. Built from horizontal runs merged by shapely, so it is exact."""
    import shapely
    from shapely.geometry import MultiPolygon

    x0s, x1s, ys = [], [], []
    for y in np.flatnonzero(mask.any(1)):
        row = np.concatenate([[0], mask[y].astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(row))
        x0s.append(edges[::2])
        x1s.append(edges[1::2])
        ys.append(np.full(len(edges) // 2, y))
    x0s, x1s, ys = (np.concatenate(a).astype(float) for a in (x0s, x1s, ys))
    boxes = shapely.box(x0s, ys, x1s, ys + 1)
    geom = shapely.union_all(boxes).simplify(0)
    geoms = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    polys = []
    for g in geoms:
        coords = list(g.exterior.coords)[:-1]
        polys.append([float(v) for xy in coords for v in xy])
    return polys


# ---------------------------------------------------------------------------------------------
# Writing the three views
# ---------------------------------------------------------------------------------------------

def _link_or_copy(src, dst):
    """The three views share image bytes; a hard link saves disk where the filesystem allows."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _annotate(ids, cats):
    """Per-instance records shared by the COCO and Cityscapes writers."""
    out = []
    for k, cat in enumerate(cats, 1):
        mask = ids == k
        rs, cs = _bbox_slices(mask)
        out.append({
            "category": cat,
            "mask": mask,
            "area": int(mask.sum()),
            "bbox": [int(cs.start), int(rs.start), int(cs.stop - cs.start), int(rs.stop - rs.start)],
        })
    return out


def _write_split(tmp, split, n, seed, height, width, params, progress):
    cats = categories()
    coco_dir = os.path.join(tmp, "coco", split)
    cs_img_dir = os.path.join(tmp, "cityscapes", "leftImg8bit", split, CITY)
    cs_gt_dir = os.path.join(tmp, "cityscapes", "gtFine", split, CITY)
    voc_dir = os.path.join(tmp, "voc", f"VOC{VOC_YEAR}")
    for d in [coco_dir, cs_img_dir, cs_gt_dir] + [
            os.path.join(voc_dir, sub) for sub in ("JPEGImages", "Annotations",
                                                   os.path.join("ImageSets", "Main"))] + [
            os.path.join(tmp, view, split, c["name"]) for c in cats
            for view in ("imagefolder", "objects")]:
        os.makedirs(d, exist_ok=True)
    images, annotations, voc_ids = [], [], []
    per_cat = {c["name"]: 0 for c in cats}
    per_label = {c["name"]: 0 for c in cats}
    per_object = {c["name"]: 0 for c in cats}
    for index in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_INDEX[split], index]))
        image, ids, inst_cats = sample_scene(rng, height, width, params)
        insts = _annotate(ids, inst_cats)
        stem = image_stem(index)
        img_path = os.path.join(coco_dir, stem + ".png")
        Image.fromarray(image).save(img_path, format="PNG")

        # COCO view
        image_id = index + 1
        images.append({"id": image_id, "file_name": stem + ".png", "height": height, "width": width})
        for inst in insts:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": inst["category"] + 1,
                "segmentation": pixel_edge_polygons(inst["mask"]),
                "area": inst["area"], "bbox": inst["bbox"], "iscrowd": 0,
            })
            per_cat[cats[inst["category"]]["name"]] += 1

        # ImageFolder view: label = category of the largest visible object
        if not insts:
            raise RuntimeError(f"scene {split}/{index} has no object (generator bug)")
        largest = max(insts, key=lambda r: (r["area"], -r["category"]))  # ties: lower id wins
        label = cats[largest["category"]]["name"]
        per_label[label] += 1
        _link_or_copy(img_path, os.path.join(tmp, "imagefolder", split, label, stem + ".png"))

        # objects view: one crop per instance, labelled by its category
        for k, inst in enumerate(insts, 1):
            x0, y0, x1, y1 = object_crop(inst["bbox"], height, width)
            name = cats[inst["category"]]["name"]
            per_object[name] += 1
            Image.fromarray(image[y0:y1, x0:x1]).save(
                os.path.join(tmp, "objects", split, name, f"{stem}_{k}.png"), format="PNG")

        # VOC view (JPEG, as VOC's JPEGImages; quality 95)
        file_id = voc_id(split, index)
        voc_ids.append(file_id)
        Image.fromarray(image).save(os.path.join(voc_dir, "JPEGImages", file_id + ".jpg"),
                                    format="JPEG", quality=95)
        with open(os.path.join(voc_dir, "Annotations", file_id + ".xml"), "w") as f:
            f.write(voc_annotation(file_id, height, width, insts, cats))

        # Cityscapes view
        cs_stem = cityscapes_stem(index)
        _link_or_copy(img_path, os.path.join(cs_img_dir, cs_stem + "_leftImg8bit.png"))
        bg_name, bg_id = BACKGROUND_LABEL
        instance_img = np.full((height, width), bg_id, np.uint16)
        label_img = np.full((height, width), bg_id, np.uint8)
        counters = {}
        objects = [{"label": bg_name,
                    "polygon": [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]}]
        for inst in insts:
            c = cats[inst["category"]]
            k = counters.get(c["cityscapes_id"], 0)
            counters[c["cityscapes_id"]] = k + 1
            instance_img[inst["mask"]] = c["cityscapes_id"] * 1000 + k
            label_img[inst["mask"]] = c["cityscapes_id"]
            objects.append({"label": c["cityscapes_name"],
                            "polygon": [[int(x), int(y)] for x, y in trace_centre_contour(inst["mask"])]})
        # 16-bit PNG, like Cityscapes' own instanceIds files
        Image.fromarray(instance_img.astype(np.uint16)).save(
            os.path.join(cs_gt_dir, cs_stem + "_gtFine_instanceIds.png"), format="PNG")
        Image.fromarray(label_img, "L").save(
            os.path.join(cs_gt_dir, cs_stem + "_gtFine_labelIds.png"), format="PNG")
        train_ids = np.full(256, 255, np.uint8)  # every other id: ignore, as cityscapesscripts
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            train_ids[label_id] = train_id
        Image.fromarray(train_ids[label_img], "L").save(
            os.path.join(cs_gt_dir, cs_stem + "_gtFine_labelTrainIds.png"), format="PNG")
        # plain write: the whole dataset folder is moved into place atomically at the end
        with open(os.path.join(cs_gt_dir, cs_stem + "_gtFine_polygons.json"), "w") as f:
            json.dump({"imgHeight": height, "imgWidth": width, "objects": objects}, f)
        if progress is not None:
            progress(split, index)

    with open(os.path.join(voc_dir, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("".join(i + "\n" for i in voc_ids))

    coco = {
        "info": {"description": "loco_det synthetic shapes", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in cats],
    }
    # compact, like COCO's own files (indenting would triple the size of the polygon lists)
    _write_json(os.path.join(tmp, "coco", "annotations", f"instances_{split}.json"), coco,
                indent=None)
    return {"images": n, "instances": len(annotations), "instances_per_category": per_cat,
            "imagefolder_labels": per_label, "objects_labels": per_object}


def _write_json(path, obj, indent):
    """Atomic JSON write whose file is readable like any other dataset file (the temporary file
    behind an atomic write is created private, 0600)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True,
                  separators=(",", ": ") if indent else (",", ":"))
        f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def request(seed, n_train, n_val, height, width, params=None):
    """The part of meta.json that identifies a dataset: equal requests give identical files."""
    if seed is None or int(seed) != seed or seed < 0:
        raise LocoError(f"seed must be a non-negative integer, got {seed!r}")
    for name, v in (("n_train", n_train), ("n_val", n_val)):
        if int(v) != v or v < 1:
            raise LocoError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v < 32:
            raise LocoError(f"{name} must be an integer >= 32, got {v!r}")
    p = dict(DEFAULT_PARAMS)
    unknown = set(params or {}) - set(p)
    if unknown:
        raise LocoError(f"unknown generator parameter(s): {', '.join(sorted(unknown))}")
    p.update(params or {})
    if not 1 <= p["min_objects"] <= p["max_objects"]:
        raise LocoError("need 1 <= min_objects <= max_objects")
    if not 0 <= p["other_typical_texture_prob"] <= 1:
        raise LocoError(f"other_typical_texture_prob must be in [0, 1], got "
                        f"{p['other_typical_texture_prob']!r}")
    return {"generator": GENERATOR, "format_version": FORMAT_VERSION, "seed": int(seed),
            "splits": {"train": int(n_train), "val": int(n_val)},
            "height": int(height), "width": int(width), "params": p,
            "categories": categories(),
            "cityscapes_background": {"name": BACKGROUND_LABEL[0], "id": BACKGROUND_LABEL[1]},
            "cityscapes_train_ids": {str(k): v for k, v in CITYSCAPES_TRAIN_IDS.items()},
            "voc_year": VOC_YEAR, "city": CITY, "object_crop": dict(OBJECT_CROP)}


def read_meta(out):
    """meta.json of a generated dataset, or None when there is none."""
    path = os.path.join(out, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LocoError(f"cannot read {path}: {e}") from e


def _same_request(meta, req):
    return meta is not None and all(meta.get(k) == v for k, v in req.items())


def generate(out, seed, n_train, n_val, height, width, params=None, overwrite=False,
             progress=None):
    """Write the embedded dataset to `out` (layout: docs/formats.md) and return its meta dict.

    The dataset is built in a temporary sibling folder and moved into place at the end, so `out`
    never holds a half-written dataset. If `out` already holds the same request (same meta),
    nothing is regenerated. If it holds anything else, this refuses rather than mixing two
    datasets, unless `overwrite`; even then, only an empty folder or one written by this
    generator (it has our meta.json) is replaced, never an unrelated folder.

    `progress`, if given, is called as progress(split, index) after each image.
    """
    req = request(seed, n_train, n_val, height, width, params)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    old_name = os.path.join(parent, os.path.basename(out) + "_old")
    for leftover in (out, old_name):  # folders of earlier generator runs that were killed
        remove_stale_temps(leftover)
    existing = None
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise LocoError(f"{out} exists and is not a directory")
        existing = read_meta(out)
        if _same_request(existing, req) and not overwrite:
            return existing
        if existing is None and os.listdir(out):
            raise LocoError(f"{out} is not empty and holds no loco_det meta.json; "
                            "refusing to write a dataset into it (choose another --out)")
        if existing is not None and existing.get("generator") != GENERATOR:
            raise LocoError(f"{out}/meta.json was not written by {GENERATOR}; refusing to replace it")
        if existing is not None and not overwrite:
            diff = sorted(k for k, v in req.items() if existing.get(k) != v)
            raise LocoError(f"{out} holds a different synthetic dataset (differs in: "
                            f"{', '.join(diff)}); pass --overwrite to replace it")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(out))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is not
        counts = {}
        for split, n in (("train", n_train), ("val", n_val)):
            counts[split] = _write_split(tmp, split, n, seed, height, width, req["params"], progress)
        meta = dict(req, counts=counts)
        _write_json(os.path.join(tmp, "meta.json"), meta, indent=2)
        if os.path.exists(out):
            old = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(old_name))
            os.rename(out, os.path.join(old, "data"))
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
