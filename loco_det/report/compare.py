"""Comparisons: each measured row against the reference method and random init of its
comparison group, as a difference with its t interval and verdict (loco_det/stats.py)."""
from .. import stats
from ..records import RANDOM_METHOD
from .rows import group_key

# res5 (the encoder's output) in linear readout and in both kNN readouts (knn.json beside
# readout.json, k 20 and 200); a metric a row lacks is not compared.
COMPARED = {"detection": ("APbb", "APmk", "mIoU"),
            "readout": ("top1/res5", "knn/k20/res5", "knn/k200/res5")}
DEFAULT_REFERENCE = "e2e"
RANDOM_LABELS = ("random", "random init")


def _paired_values(row_a, row_b, metric):
    """The per-seed values of both rows, keyed so that stats.compare pairs them exactly when
    every repetition of each row has a partner (same split / seed) in the other."""
    a, b = row_a.per_seed(metric), row_b.per_seed(metric)
    parts = lambda row: [dict(k) for k in row.by_seed()]
    common = sorted(set.intersection(*[set(p) for p in parts(row_a) + parts(row_b)])
                    if parts(row_a) and parts(row_b) else set())
    # a shared pretraining seed only pairs pretrained rows; against random init, splits/seeds
    def reduce(vals):
        out = {}
        for key, value in vals.items():
            k = tuple((c, dict(key).get(c)) for c in common)
            if k in out:
                return None
            out[k] = value
        return out
    ra, rb = reduce(a), reduce(b)
    if common and ra is not None and rb is not None and set(ra) == set(rb):
        return ra, rb
    return ({("a", i): v for i, v in enumerate(a.values())},
            {("b", i): v for i, v in enumerate(b.values())})


def _is_random(row):
    return row.label in RANDOM_LABELS or (row.runs and all(
        r.method == RANDOM_METHOD for r in row.runs))


def _matches(row, name):
    return row.label == name or (row.runs and all(r.method == name for r in row.runs))


def comparisons(rows, reference=DEFAULT_REFERENCE):
    """[dict] one per (group, metric, method, baseline): each measured row against the
    reference method's rows and against random init in its comparison group."""
    out = []
    for kind in COMPARED:
        groups = {}
        for row in rows[kind]:
            if row.runs:
                groups.setdefault(group_key(row), []).append(row)
        for gkey, grows in groups.items():
            refs = [r for r in grows if _matches(r, reference) and not _is_random(r)]
            randoms = [r for r in grows if _is_random(r)]
            for metric in COMPARED[kind]:
                for row in grows:
                    for base, role in [(b, "reference") for b in refs] + [
                            (b, "random init") for b in randoms]:
                        if base is row or (role == "reference" and _is_random(row)):
                            continue
                        a, b = _paired_values(row, base, metric)
                        if not a or not b:
                            continue
                        c = stats.compare(a, b)
                        out.append({"kind": kind, "dataset": row.protocol.get("dataset", "?"),
                                    "group": _group_text(row), "metric": metric,
                                    "method": row.label, "vs": base.label, "role": role,
                                    "comparison": c})
    return out


def _group_text(row):
    p = row.protocol
    if row.kind == "detection":
        return (f"{p.get('benchmark')}: {p.get('config')}, {p.get('train_set')}, "
                f"{p.get('schedule')}")
    return (f"{p.get('dataset')}: {p.get('readout')} readout, {p.get('readout_epochs')} epochs, lr {p.get('lr')}, "
            f"{p.get('image_size')} px, {p.get('train_images')} images")


