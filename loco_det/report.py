"""Benchmark report: collect pretraining, readout and detection runs into report.md, report.csv
and PNG plots.

Why it is built this way:
- Numbers are only ever averaged within one *computation*: runs are grouped by their fingerprint
  (loco_det/fingerprint.py: everything that defines what a run computed except the seed), never
  by label, and by the protocol columns shown. Two different pretrainings never share a row;
  rows whose labels collide get a suffix naming what differs (`e2e [MODEL.DECODER.CONV_BLOCKS=1]`).
  n counts distinct seeds (or splits): the same seed run twice is flagged as a repeat and counted
  once (the mean of its repeats).
- Every comparison carries its uncertainty: each method against a reference method and against
  random init, as a mean difference with a 95% t interval (paired over shared seeds or splits,
  Welch otherwise) and a verdict (loco_det/stats.py). With one run there is no interval and the
  verdict says "not resolved (1 run)".
- A run that is missing or unfinished is shown as such, never as 0: a zero in a results table
  reads as a measurement.
- The paper's numbers (loco_det/paper_reference.yaml, the paper cited there) are printed last,
  in their own section and file, never in a measured table, so a reader cannot mistake them for
  ours.
- report.md opens with one summary table (method x benchmark, headline metric as mean ± std (n)
  and the verdict against the reference method); the measured tables follow, one table per
  protocol so that each reads on a screen.
- Only runs the grid asked for are listed: a manifest entry without a job id (a baseline the
  grid did not request, such as published supervised weights it was not given) is not a run.
- Labels: the method label of a run is what `tools/run_benchmark.py` records in its manifest
  (`benchmark.json`) and passes to train_net as LOCO_DET.LABEL; without a manifest it falls back
  to the method named in the run's own files.

Input formats: docs/formats.md. Output: DIR/report.md, DIR/report.csv, DIR/comparisons.csv,
DIR/paper_reference.csv, DIR/plots/*.png, each written atomically.
"""
import csv
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import yaml

from . import fingerprint as fp
from . import stats
from .utils import LocoError, atomic_write, check_no_links

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "benchmark.json"
STAGES = ("res2", "res3", "res4", "res5")
DET_METRICS = (("APbb", "bbox", "AP"), ("APmk", "segm", "AP"), ("APbb50", "bbox", "AP50"),
               ("APbb75", "bbox", "AP75"), ("APmk50", "segm", "AP50"), ("APmk75", "segm", "AP75"),
               ("mIoU", "sem_seg", "mIoU"), ("iIoU", "sem_seg", "iIoU"))
# Benchmarks that are not Mask R-CNN: their own tables (other metrics), not in the AP plot.
# VOC: Faster R-CNN box AP by PascalVOCDetectionEvaluator; sem seg: cityscapesscripts mIoU.
OTHER_TASKS = {"voc": ("VOC detection (Faster R-CNN), measured",
                       "AP in % by Detectron2's PascalVOCDetectionEvaluator (VOC07 11-point AP "
                       "on a 2007 test set); MoCo's protocol reports the mean of 5 trials.",
                       ("APbb50", "APbb", "APbb75")),
               "cityscapes_sem_seg": ("Cityscapes semantic segmentation, measured",
                                      "mIoU / iIoU in % by cityscapesscripts' pixel-level "
                                      "evaluation (CityscapesSemSegEvaluator).",
                                      ("mIoU", "iIoU"))}
KNN_KS = (20, 200)
PLOTS = {"pretrain": "plots/pretrain_loss.png", "readout": "plots/readout_top1.png",
         "detection": "plots/detection_ap.png"}

# The paper's numbers live in one data file beside this module, with the paper cited; the
# report prints them in their own section and file, never in a measured table.
PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_reference.yaml")


def load_paper_reference(path=PAPER_FILE):
    """(citation, tables) of the paper's reference numbers (loco_det/paper_reference.yaml)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise LocoError(f"{path}: cannot read the paper's reference numbers: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), list):
        raise LocoError(f"{path}: expected a mapping with 'citation' and a list 'tables'")
    for i, table in enumerate(data["tables"]):
        for key in ("title", "header", "rows"):
            if key not in table:
                raise LocoError(f"{path}: tables[{i}] has no '{key}'")
        for row in table["rows"]:
            if len(row) != len(table["header"]):
                raise LocoError(f"{path}: tables[{i}] ({table['title']}): row {row} has "
                                f"{len(row)} cells for {len(table['header'])} columns")
    return str(data.get("citation", "")), data["tables"]


PAPER_CITATION, PAPER_TABLES = load_paper_reference()

# Protocol fields shown in every measured row, per kind (display names).
PROTOCOL_FIELDS = {
    "pretrain": ("recipe", "arch", "decoder", "epochs", "world_size", "global_batch"),
    "readout": ("pretraining", "decoder", "arch", "readout", "readout_epochs", "lr",
                "batch_size", "image_size", "train_images"),
    "detection": ("benchmark", "config", "train_set", "schedule", "weights", "decoder",
                  "backbone", "world_size", "global_batch"),
}
# Protocol fields that may differ between the rows being compared (the learning rule, its
# decoder, and what the baseline protocol prescribes for random init); the others must match.
COMPARE_FREE = {"pretrain": ("decoder",), "readout": ("pretraining", "decoder"),
                "detection": ("weights", "decoder", "backbone")}
# The metrics compared between methods, per kind (higher is better).
COMPARED = {"detection": ("APbb", "APmk", "mIoU"), "readout": ("top1/res5",)}
DEFAULT_REFERENCE = "e2e"
RANDOM_LABELS = ("random", "random init")


@dataclass
class Run:
    """One run directory (or one expected run from a manifest that has no directory)."""
    kind: str                      # "pretrain" | "readout" | "detection"
    path: str
    status: str                    # "finished" | "unfinished" | "missing"
    label: str
    protocol: dict = field(default_factory=dict)
    seed: object = None
    metrics: dict = field(default_factory=dict)
    note: str = ""
    curves: dict = field(default_factory=dict)   # pretrain: unit -> ([steps], [losses])
    fingerprint: str = ""          # run identity without the seed (loco_det/fingerprint.py)
    identity: dict = field(default_factory=dict)  # flat settings behind it (for label suffixes)
    method: str = ""               # the learning rule (MODEL.METHOD), when known
    seed_parts: dict = field(default_factory=dict)  # pretrain / split / seed -> value

    def seed_key(self):
        """Distinct-repetition identity: the same key twice in one row is a repeat."""
        return tuple(sorted((k, str(v)) for k, v in self.seed_parts.items() if v is not None))

    def match_key(self):
        """What a missing run can be matched on: its label and config/recipe name."""
        name = self.protocol.get("config") or self.protocol.get("recipe") or ""
        return (self.kind, self.label, name if self.kind != "readout" else "")


@dataclass
class Row:
    """Runs of one label under one protocol: the unit that gets a mean +- std."""
    kind: str
    label: str
    protocol: dict
    runs: list = field(default_factory=list)          # finished runs
    others: list = field(default_factory=list)        # missing / unfinished runs matched here

    def by_seed(self):
        """{seed key: [runs]} of the finished runs, in seed order."""
        out = {}
        for r in sorted(self.runs, key=lambda r: str(r.seed)):
            out.setdefault(r.seed_key(), []).append(r)
        return out

    def per_seed(self, metric):
        """{seed key: value}; repeats of one seed are averaged (they are one repetition)."""
        out = {}
        for key, runs in self.by_seed().items():
            vals = [r.metrics[metric] for r in runs if metric in r.metrics]
            if vals:
                out[key] = stats.mean_std(vals)[0]
        return out

    def values(self, metric):
        return list(self.per_seed(metric).values())

    def stat(self, metric):
        """(mean, sample std or None, n distinct seeds); None when no run has the metric."""
        vals = self.values(metric)
        return stats.mean_std(vals) if vals else None

    def repeats(self):
        """{seed: count} of seeds that were run more than once."""
        return {str(runs[0].seed): len(runs) for runs in self.by_seed().values()
                if len(runs) > 1}

    def seeds(self):
        """Distinct seeds, comma-separated."""
        return ",".join(str(runs[0].seed) for runs in self.by_seed().values())

    def status(self):
        if not self.runs:
            kinds = sorted({o.status for o in self.others})
            return "/".join(kinds) if kinds else "missing"
        counts = {}
        for o in self.others:
            counts[o.status] = counts.get(o.status, 0) + 1
        parts = [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))] if counts else ["ok"]
        parts += [f"repeat: seed {seed} run {n}x (counted once)"
                  for seed, n in self.repeats().items()]
        parts += sorted({r.note for r in self.runs if r.note})
        return "; ".join(parts)


# ----------------------------------------------------------------------------- reading runs

def _read_json(path):
    """Parsed JSON, or raise ValueError with a one-line reason (the run is then 'unfinished')."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {os.path.basename(path)}: {e}") from None


def _read_yaml(path):
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(d, dotted, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _stem(path):
    base = os.path.basename(str(path or ""))
    return base[:-5] if base.endswith(".yaml") else (base[:-4] if base.endswith(".yml") else base)


def _argv_value(argv, flag):
    """Value after `flag` in an argv list (Detectron2 KEY VALUE pairs or --option value)."""
    argv = list(argv or [])
    for i, a in enumerate(argv[:-1]):
        if a == flag:
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _decoder(cfg):
    """'conv C, mlp M' of a pretraining config's MODEL.DECODER, '?' when not recorded."""
    if _get(cfg, "MODEL.METHOD") == "supervised":
        return "linear classifier"   # the supervised rule has no decoder (pooled res5 -> fc)
    conv, mlp = _get(cfg, "MODEL.DECODER.CONV_BLOCKS"), _get(cfg, "MODEL.DECODER.MLP_LAYERS")
    if conv is None and mlp is None:
        return "?"
    return f"conv {'?' if conv is None else conv}, mlp {'?' if mlp is None else mlp}"


def _pretrain_identity(d, info, cfg):
    """(fingerprint, flat identity) of the pretraining run in `d`: the recorded fingerprint,
    else one computed from its config.yaml; ("", {}) without either."""
    identity = fp.pretrain_identity(cfg) if cfg else {}
    recorded = info.get("fingerprint") if isinstance(info, dict) else None
    if recorded:
        return str(recorded), identity
    return (fp.digest(identity) if identity else ""), identity


def _read_pretrain(d, files):
    info = _read_json(os.path.join(d, "run_info.json")) if "run_info.json" in files else {}
    cfg = _read_yaml(os.path.join(d, "config.yaml"))
    method = info.get("method") or _get(cfg, "MODEL.METHOD") or "?"
    recipe = _stem(info.get("config_file")) or "?"
    protocol = {"recipe": recipe, "arch": info.get("arch") or _get(cfg, "MODEL.ARCH", "?"),
                "decoder": _decoder(cfg),
                "epochs": info.get("epochs", _get(cfg, "OPTIM.EPOCHS", "?")),
                "world_size": info.get("world_size", "?"),
                "global_batch": info.get("global_batch", _get(cfg, "OPTIM.BATCH_SIZE", "?"))}
    run = Run("pretrain", d, "unfinished", method, protocol, seed=_get(cfg, "SEED"))
    run.method = method
    run.fingerprint, run.identity = _pretrain_identity(d, info, cfg)
    run.seed_parts = {"seed": run.seed}
    run.curves, bad, total = _read_curves(os.path.join(d, "metrics.jsonl"))
    if bad:
        run.note = f"metrics.jsonl: {bad} of {total} lines unreadable"
    if "summary.json" not in files:
        run.note = "; ".join(filter(None, ["no summary.json", run.note]))
        return run
    summary = _read_json(os.path.join(d, "summary.json"))
    if summary.get("finished") is not True:
        run.note = "; ".join(filter(None, ["summary.json without finished=true", run.note]))
        return run
    run.status = "finished"
    for unit, loss in sorted((summary.get("final_losses") or {}).items()):
        run.metrics[f"final_loss/{unit}"] = float(loss)
    if isinstance(summary.get("wall_time_s"), (int, float)):
        run.metrics["wall_time_s"] = float(summary["wall_time_s"])
    return run


def _read_curves(path):
    """(per-unit loss curves, unreadable lines, lines) from metrics.jsonl. Unreadable lines are
    counted, never silently dropped: the run's row says how many (a torn last line of a killed
    run is one)."""
    curves, bad, total = {}, 0, 0
    if not os.path.isfile(path):
        return curves, bad, total
    with open(path, errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            total += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(rec, dict):
                bad += 1
                continue
            step = rec.get("step", i)
            for key, value in rec.items():
                if key.startswith("loss/") and isinstance(value, (int, float)):
                    xs, ys = curves.setdefault(key[5:], ([], []))
                    xs.append(step)
                    ys.append(float(value))
    return curves, bad, total


def _run_dir_of(checkpoint):
    """Folder of a checkpoint named in readout.json: as given, else relative to the repository
    root (where tools/run_benchmark.py runs the readout), else as given."""
    d = os.path.dirname(str(checkpoint))
    if not os.path.isabs(d) and not os.path.isdir(d):
        in_repo = os.path.join(REPO, d)
        if os.path.isdir(in_repo):
            return in_repo
    return d


def _pretraining_of(checkpoint):
    """Recipe name of the pretraining run that wrote `checkpoint` (its run_info.json), else
    the checkpoint path itself, so readouts of different checkpoints never aggregate."""
    if not checkpoint:
        return "random init"
    info_path = os.path.join(_run_dir_of(checkpoint), "run_info.json")
    if os.path.isfile(info_path):
        try:
            info = _read_json(info_path)
        except ValueError:
            info = {}
        if info.get("config_file"):
            return _stem(info["config_file"])
    return str(checkpoint)


def _checkpoint_run(checkpoint):
    """(run_info, config) of the pretraining run that wrote `checkpoint` ({} where absent)."""
    if not checkpoint:
        return {}, {}
    d = _run_dir_of(checkpoint)
    info = {}
    if os.path.isfile(os.path.join(d, "run_info.json")):
        try:
            info = _read_json(os.path.join(d, "run_info.json"))
        except ValueError:
            info = {}
    return info, _read_yaml(os.path.join(d, "config.yaml"))


def _read_readout(d):
    r = _read_json(os.path.join(d, "readout.json"))
    p = r.get("protocol") or {}
    method = r.get("method") or "?"
    info, pre_cfg = _checkpoint_run(r.get("checkpoint"))
    pre_fp, pre_identity = _pretrain_identity(None, info, pre_cfg)
    ckpt_fp = r.get("checkpoint_fingerprint") or pre_fp or (
        fp.random_init_fingerprint(r.get("arch")) if method == "random" and not r.get("checkpoint")
        else "path:" + str(r.get("checkpoint")))
    protocol = {"pretraining": "random init" if method == "random"
                else _pretraining_of(r.get("checkpoint")),
                "decoder": "-" if method == "random" else _decoder(pre_cfg),
                "arch": r.get("arch", "?"), "readout": p.get("name", "?"),
                "readout_epochs": p.get("epochs", "?"),
                "lr": p.get("lr", "?"), "batch_size": p.get("batch_size", "?"),
                "image_size": p.get("image_size", "?"), "train_images": p.get("train_images", "?")}
    run = Run("readout", d, "finished", method, protocol)
    top1 = r.get("top1") or {}
    for stage in STAGES:
        if isinstance(top1.get(stage), (int, float)):
            run.metrics[f"top1/{stage}"] = float(top1[stage])
    _read_knn(d, run)
    seed = r.get("checkpoint_seed")
    if seed is None:
        seed = _get(pre_cfg, "SEED")
    # n counts pretrainings: the seed of a readout is its checkpoint's; two readouts of one
    # checkpoint are repeats. The random-init encoder's seed is the readout's own.
    run.seed = seed if seed is not None else p.get("seed", "-")
    run.seed_parts = {"seed": run.seed}
    run.method = method
    run.fingerprint = r.get("fingerprint") or fp.readout_fingerprint(p, ckpt_fp)
    run.identity = dict(pre_identity, **{f"readout.{k}": v for k, v in
                                         fp.readout_identity(p, ckpt_fp).items()
                                         if k != "checkpoint"})
    return run


def _read_knn(d, run):
    """knn.json beside readout.json (tools/knn_readout.py): top-1 per k and stage as metrics
    "knn/k20/res5", ..., and its protocol as run.protocol["knn"] (kNN rows group by it)."""
    path = os.path.join(d, "knn.json")
    if not os.path.isfile(path):
        return
    r = _read_json(path)
    p = r.get("protocol") or {}
    run.protocol["knn"] = (f"T {p.get('temperature', '?')}, {p.get('image_size', '?')} px, "
                           f"{p.get('train_images', '?')} train / {p.get('val_images', '?')} val")
    for kk, per in (r.get("top1") or {}).items():
        for stage in STAGES:
            value = (per or {}).get(stage)
            if isinstance(value, (int, float)):
                run.metrics[f"knn/{kk}/{stage}"] = float(value)


def _train_set(datasets):
    """DATASETS.TRAIN with split seeds generalised (coco_2017_train_10k_seed3 -> ..._seed*), so
    the runs on the 5 random splits form one row, as in the paper."""
    if isinstance(datasets, str):
        datasets = [datasets]
    names = [re.sub(r"seed\d+", "seed*", str(n)) for n in (datasets or [])]
    return "+".join(names) or "?"


def _read_detection(d, files):
    info = {}
    if "run_info.json" in files:
        try:
            info = _read_json(os.path.join(d, "run_info.json"))
        except ValueError:
            info = {}
    cfg = _read_yaml(os.path.join(d, "config.yaml"))
    argv = info.get("argv") or []
    results, note = None, ""
    if "results.json" in files:
        try:
            results = _read_json(os.path.join(d, "results.json"))
        except ValueError as e:
            note = str(e)
    p = (results or {}).get("protocol") or {}
    freeze_at = p.get("freeze_at", _get(cfg, "MODEL.BACKBONE.FREEZE_AT"))
    frozen = p.get("frozen", None if freeze_at is None else freeze_at >= 5)
    norm = _get(cfg, "MODEL.RESNETS.NORM")
    backbone = ("?" if frozen is None else "frozen" if frozen else "fine-tuned") + (
        f" (FREEZE_AT {freeze_at}" + (f", {norm})" if norm else ")")
        if freeze_at is not None else "")
    config = p.get("config_name") or _get(cfg, "LOCO_DET.CONFIG_NAME") or \
        _stem(_argv_value(argv, "--config-file")) or "?"
    max_iter = p.get("max_iter", _get(cfg, "SOLVER.MAX_ITER"))
    test_sets = str(_get(cfg, "DATASETS.TEST", ""))
    benchmark = p.get("benchmark") or _get(cfg, "LOCO_DET.BENCHMARK") or (
        "voc" if "voc_" in test_sets else
        "cityscapes_sem_seg" if "cityscapes" in test_sets and "sem_seg" in test_sets else
        "cityscapes" if "cityscapes" in test_sets else "coco" if cfg else "?")
    res = results or {}
    from_scratch = p.get("from_scratch", _get(cfg, "LOCO_DET.FROM_SCRATCH"))
    weights_fp = (res.get("weights_fingerprint") or _get(cfg, "LOCO_DET.WEIGHTS_FINGERPRINT")
                  or (fp.RANDOM_INIT if from_scratch else ""))
    source = res.get("weights_source") or _get(cfg, "LOCO_DET.WEIGHTS_SOURCE") or ""
    pre_info, pre_cfg = _checkpoint_run(source)
    pre_fp, pre_identity = _pretrain_identity(None, pre_info, pre_cfg)
    if weights_fp == fp.RANDOM_INIT:
        weights_col, decoder = "random init", "-"
    elif pre_cfg or pre_info:
        weights_col = _stem(pre_info.get("config_file")) or "pretrained here"
        decoder = _decoder(pre_cfg)
    elif weights_fp.startswith("sha256:"):
        weights_col, decoder = "published", "-"
    else:
        weights_col, decoder = "?", "?"
    protocol = {"benchmark": benchmark, "config": config,
                "train_set": _train_set(_get(cfg, "DATASETS.TRAIN")),
                "schedule": f"{max_iter} it" if max_iter is not None else "?",
                "weights": weights_col, "decoder": decoder,
                "backbone": backbone,
                "world_size": p.get("world_size", info.get("world_size", "?")),
                "global_batch": p.get("global_batch", _get(cfg, "SOLVER.IMS_PER_BATCH", "?"))}
    label = ((results or {}).get("method") or _get(cfg, "LOCO_DET.LABEL")
             or _get(cfg, "LOCO_DET.RESOLVED_METHOD") or _argv_value(argv, "LOCO_DET.LABEL")
             or "?")
    split = re.search(r"seed(\d+)", str(_get(cfg, "DATASETS.TRAIN", "")))
    det_seed = p.get("seed", _get(cfg, "SEED"))
    pre_seed = res.get("weights_seed")
    if pre_seed is None and _get(cfg, "LOCO_DET.WEIGHTS_SEED", -1) not in (None, -1):
        pre_seed = _get(cfg, "LOCO_DET.WEIGHTS_SEED")
    seed = det_seed
    if split and str(split.group(1)) != str(det_seed):
        seed = f"split{split.group(1)}/seed{det_seed}"
    if pre_seed is not None and str(pre_seed) != str(det_seed):
        seed = f"pre{pre_seed}/{seed}"
    run = Run("detection", d, "unfinished", label, protocol, seed=seed, note=note)
    run.seed_parts = {"pretrain": pre_seed, "split": split.group(1) if split else None,
                      "seed": det_seed}
    if not weights_fp:   # weights of unknown identity: never pooled with other labels' runs
        weights_fp = f"unidentified:{label}:{p.get('weights', _get(cfg, 'MODEL.WEIGHTS'))}"
    run.fingerprint = res.get("fingerprint") or (
        fp.detection_fingerprint(cfg, weights_fp) if cfg else fp.digest(
            [{k: v for k, v in p.items() if k not in ("seed", "weights")}, weights_fp]))
    run.identity = dict(pre_identity, **(fp.detection_identity(cfg, weights_fp) if cfg else {}))
    run.method = str(_get(pre_cfg, "MODEL.METHOD") or pre_info.get("method") or (
        "random" if weights_fp == fp.RANDOM_INIT else label))
    if results is None:
        run.note = note or "no results.json"
        return run
    if results.get("finished") is not True:
        run.note = "results.json without finished=true"
        return run
    run.status = "finished"
    for name, task, key in DET_METRICS:
        value = (results.get(task) or {}).get(key)
        if isinstance(value, (int, float)) and value == value:  # NaN: not a measurement
            run.metrics[name] = float(value)
    return run


def _read_dir(d, files):
    """The run in directory `d`, or None when `d` holds no run."""
    if "readout.json" in files:
        return _read_readout(d)
    info_kind = None
    if "run_info.json" in files:
        try:
            info_kind = _read_json(os.path.join(d, "run_info.json")).get("kind")
        except ValueError:
            info_kind = None
    if info_kind == "pretrain" or (info_kind is None and ({"summary.json", "metrics.jsonl"} & files)):
        return _read_pretrain(d, files)
    if info_kind == "detection" or "results.json" in files:
        return _read_detection(d, files)
    return None


def collect(run_dirs):
    """(runs, manifests, problems): every run found under `run_dirs` (recursively), plus the
    expected runs of any benchmark manifest found there that have no finished directory."""
    runs, manifests, problems = [], [], []
    for root in run_dirs:
        if not os.path.exists(root):
            raise LocoError(f"{root}: directory does not exist")
        if not os.path.isdir(root):
            raise LocoError(f"{root}: not a directory")
    for root in run_dirs:
        for d, subdirs, files in os.walk(root):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith(".") and s != "plots")
            files = set(files)
            if MANIFEST in files:
                try:
                    manifests.append((d, _read_json(os.path.join(d, MANIFEST))))
                except ValueError as e:
                    problems.append(f"{d}: {e}")
            try:
                run = _read_dir(d, files)
            except ValueError as e:  # e.g. a corrupt readout.json: the run did not finish
                run = Run(_guess_kind(files), d, "unfinished", "?", note=str(e))
            if run is not None:
                runs.append(run)
    _apply_manifests(runs, manifests)
    return runs, manifests, problems


def _guess_kind(files):
    return "readout" if "readout.json" in files else (
        "detection" if "results.json" in files else "pretrain")


def _apply_manifests(runs, manifests):
    """Give runs their grid label and add the grid's expected runs that have no directory."""
    by_path = {os.path.realpath(r.path): r for r in runs}
    for base, manifest in manifests:
        for job in manifest.get("jobs", []):
            if job.get("kind") not in PROTOCOL_FIELDS:
                continue
            if not job.get("id"):
                # not a job of the grid: a baseline it did not request (tools/run_benchmark.py
                # notes it when it runs); listing it would count runs nobody asked for
                continue
            out = job.get("output") or ""
            path = os.path.realpath(out if os.path.isabs(out) else os.path.join(base, out))
            run = by_path.get(path)
            if run is not None:
                if job.get("label"):
                    run.label = job["label"]
                if job.get("note") and run.status != "finished":
                    run.note = "; ".join(filter(None, [run.note, job["note"]]))
                continue
            protocol = {}
            if job.get("config"):
                protocol["recipe" if job["kind"] == "pretrain" else "config"] = job["config"]
            missing = Run(job["kind"], path, "missing", job.get("label") or "?", protocol,
                          seed=job.get("seed"), note=job.get("note") or "no run directory")
            runs.append(missing)
            by_path[path] = missing


# ----------------------------------------------------------------------------- grouping

def _protocol_key(run):
    return tuple((k, str(run.protocol.get(k, "?"))) for k in PROTOCOL_FIELDS[run.kind])


def _display_label(run):
    """A `supervised` pretraining run by loco_det is labelled apart from published supervised
    weights (detection.supervised_weights, 'supervised (published weights)')."""
    if run.label == "supervised" and run.status == "finished" and (
            run.kind in ("pretrain", "readout") or run.protocol.get("weights") not in (
                "published", "?", "random init")):
        return "supervised (trained here)"
    return run.label


def build_rows(runs):
    """Rows per kind: finished runs grouped by (fingerprint, protocol), never by label; missing
    and unfinished runs are counted in the row of their label and config when exactly one such
    row exists, else they get a row of their own (with no numbers). Labels that collide within
    one comparison group get a suffix naming what differs."""
    rows = {}
    for run in runs:
        if run.status == "finished":
            key = (run.kind, run.fingerprint or ("label", run.label), _protocol_key(run))
            row = rows.setdefault(key, Row(run.kind, _display_label(run), dict(run.protocol)))
            row.runs.append(run)
    for row in rows.values():   # one label per row: the most frequent of its runs
        labels = [_display_label(r) for r in row.runs]
        row.label = max(sorted(set(labels)), key=labels.count)
    by_match = {}
    for row in rows.values():
        by_match.setdefault(row.runs[0].match_key(), []).append(row)
    for run in runs:
        if run.status == "finished":
            continue
        candidates = by_match.get(run.match_key(), [])
        if len(candidates) == 1:
            candidates[0].others.append(run)
            continue
        key = (run.kind, run.label, _protocol_key(run), run.status, run.path)
        rows[key] = Row(run.kind, run.label, dict(run.protocol), others=[run])
    out = {kind: [] for kind in PROTOCOL_FIELDS}
    for row in rows.values():
        out[row.kind].append(row)
    for kind in out:
        _suffix_colliding_labels(out[kind])
        # config first, so a missing run sits beside its config's measured rows
        out[kind].sort(key=lambda r: (str(r.protocol.get("config", "")), tuple(
            str(r.protocol.get(k, "")) for k in PROTOCOL_FIELDS[kind]), r.label))
    return out


def group_key(row):
    """Rows that are compared with each other (and whose labels must not collide): the same
    protocol except the fields a method or baseline may change (COMPARE_FREE)."""
    free = COMPARE_FREE.get(row.kind, ())
    return (row.kind,) + tuple(str(row.protocol.get(k, "")) for k in PROTOCOL_FIELDS[row.kind]
                               if k not in free)


def _fmt_value(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _suffix_colliding_labels(rows, max_keys=3):
    """`e2e` and `e2e` in one comparison group become `e2e [MODEL.DECODER.CONV_BLOCKS=0]` and
    `e2e [MODEL.DECODER.CONV_BLOCKS=1]`: the settings whose values differ between them."""
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault((group_key(row), row.label), []).append(row)
    for same in groups.values():
        if len(same) < 2:
            continue
        idents = [row.runs[0].identity for row in same]
        keys = sorted(set().union(*idents))
        differ = [k for k in keys if len({_fmt_value(i.get(k, "-")) for i in idents}) > 1]
        named = [k for k in differ if k != "weights"] or differ
        for row, ident in zip(same, idents):
            if named:
                shown = ", ".join(f"{k}={_fmt_value(ident.get(k, '-'))}"
                                  for k in named[:max_keys])
                more = f", +{len(named) - max_keys} more" if len(named) > max_keys else ""
                row.label = f"{row.label} [{shown}{more}]"
            else:
                row.label = f"{row.label} [run {row.runs[0].fingerprint[:8]}]"


# ----------------------------------------------------------------------------- comparisons

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
        r.method == "random" for r in row.runs))


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
                        out.append({"kind": kind, "group": _group_text(row), "metric": metric,
                                    "method": row.label, "vs": base.label, "role": role,
                                    "comparison": c})
    return out


def _group_text(row):
    p = row.protocol
    if row.kind == "detection":
        return (f"{p.get('benchmark')}: {p.get('config')}, {p.get('train_set')}, "
                f"{p.get('schedule')}")
    return (f"{p.get('readout')} readout, {p.get('readout_epochs')} epochs, lr {p.get('lr')}, "
            f"{p.get('image_size')} px, {p.get('train_images')} images")


def _paper_cell(value, i):
    """The i-th number of a paper cell ("32.2 / 29.9" -> 32.2 for i=0), or None."""
    parts = [x.strip() for x in str(value).split("/")]
    try:
        return float(parts[i])
    except (IndexError, ValueError):
        return None


def paper_differences():
    """The paper's own differences, method - SimCLR (end-to-end), per table, pretraining length
    and column: what our comparisons can be read beside (never mixed with them)."""
    out = []
    for table in PAPER_TABLES:
        header = table["header"]
        if header[0] == "pretraining":
            metric_names = ("APbb", "APmk")
            for epochs in sorted({r[0] for r in table["rows"] if r[0].endswith("ep")}):
                base = next((r for r in table["rows"] if r[0] == epochs and r[1] == "SimCLR"),
                            None)
                for row in table["rows"]:
                    if row[0] != epochs or base is None or row is base:
                        continue
                    for col in range(2, len(header)):
                        for i, m in enumerate(metric_names):
                            a, b = _paper_cell(row[col], i), _paper_cell(base[col], i)
                            if a is not None and b is not None:
                                out.append([table["short"], f"{epochs}",
                                            f"{row[1]} - SimCLR", header[col], m,
                                            f"{a - b:+.1f}"])
        elif header[-1] == "top-1":
            base = next(r for r in table["rows"] if r[1] == "e2e")
            for row in table["rows"]:
                if row is not base:
                    out.append(["Decoder-depth ablation", "100 ep", f"{row[1]} - e2e",
                                "ImageNet", "top-1", f"{float(row[2]) - float(base[2]):+.1f}"])
        else:
            base = table["rows"][0]
            for row in table["rows"][1:]:
                for col in range(1, len(header)):
                    out.append([table["short"], "800 ep",
                                f"{row[0]} - {base[0]}", header[col], "top-1",
                                f"{float(row[col]) - float(base[col]):+.1f}"])
    return out


def _metric_names(rows):
    names = []
    for row in rows:
        for run in row.runs:
            for m in run.metrics:
                if m not in names:
                    names.append(m)
    return sorted(names, key=lambda m: (m.startswith("wall"), m))


# ----------------------------------------------------------------------------- formatting

def fmt_stat(stat, digits=2):
    """'mean ± std' (n >= 2), the single value (n = 1); None -> ''."""
    if stat is None:
        return ""
    mean, std, n = stat
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(row, metric, digits=2):
    if not row.runs:
        return row.status()
    return fmt_stat(row.stat(metric), digits) or "n/a"


def _md_table(header, rows):
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _n_cell(row):
    """Distinct seeds (repeats are not extra n), with the expected total when runs are
    missing or unfinished."""
    n = len(row.by_seed())
    return str(n) if not row.others else f"{n} of {n + len(row.others)}"


def _protocol_cells(row):
    return [str(row.protocol.get(k, "-")) for k in PROTOCOL_FIELDS[row.kind]]


_HEADERS = {"readout": "protocol", "weights": "init", "world_size": "world size", "global_batch": "global batch",
            "readout_epochs": "readout epochs", "batch_size": "batch", "image_size": "image px",
            "train_images": "train images", "train_set": "train set"}


def _protocol_header(kind):
    return [_HEADERS.get(k, k) for k in PROTOCOL_FIELDS[kind]]


def _fmt_comparison(c, digits=2):
    """('+2.00', '[-0.48, 4.48]' or '-', test, verdict) of a stats.Comparison."""
    diff = f"{c.diff:+.{digits}f}"
    ci = "-" if c.halfwidth is None else (
        f"{c.diff:+.{digits}f} ± {c.halfwidth:.{digits}f} [{c.low:+.{digits}f}, "
        f"{c.high:+.{digits}f}]")
    df = "-" if c.df is None else (f"{c.df:.0f}" if float(c.df).is_integer() else f"{c.df:.1f}")
    test = "-" if c.test == "-" else f"{c.test}, df {df}"
    return diff, ci, test, c.verdict


# Headline metric of each benchmark in the summary (higher is better).
HEADLINE = {"voc": "APbb", "cityscapes_sem_seg": "mIoU"}
# Benchmark columns per summary table: wider tables are split so that each reads on a screen.
SUMMARY_COLUMNS = 3


def _headline(row):
    if row.kind == "readout":
        return "top1/res5"
    return HEADLINE.get(row.protocol.get("benchmark"), "APbb")


def _metric_text(metric):
    return metric.replace("top1/", "top-1 ")


def _shared_protocol_text(row):
    """The protocol every row of `row`'s comparison group shares, as one line."""
    free = COMPARE_FREE.get(row.kind, ())
    return ", ".join(f"{_HEADERS.get(k, k)} {row.protocol.get(k, '?')}"
                     for k in PROTOCOL_FIELDS[row.kind] if k not in free)


def _groups(rows):
    """[(heading row, [rows])] per comparison group, in row order. Rows without finished runs
    (missing / unfinished) join the first group of their config or recipe, else their own."""
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault(group_key(row), []).append(row)
    for row in rows:
        if row.runs:
            continue
        name = row.protocol.get("config") or row.protocol.get("recipe")
        home = next((g for g in groups.values() if name and name in (
            g[0].protocol.get("config"), g[0].protocol.get("recipe"))), None)
        if home is not None:
            home.append(row)
        else:
            groups[("unmatched", row.kind, row.label, id(row))] = [row]
    return list(groups.values())


def _group_heading(grows):
    head = grows[0]
    if not head.runs:
        name = head.protocol.get("config") or head.protocol.get("recipe") or "?"
        return f"{name} (no finished run)", ""
    if head.kind == "detection":
        title = f"{head.protocol.get('benchmark')}: {head.protocol.get('config')}"
    else:
        title = (f"{head.protocol.get('arch')}, {head.protocol.get('readout')} readout, "
                 f"{head.protocol.get('train_images')} train images")
    return title, _shared_protocol_text(head)


def _free_cells(row):
    return [str(row.protocol.get(k, "-")) for k in COMPARE_FREE[row.kind]]


def _free_header(kind):
    return [_HEADERS.get(k, k) for k in COMPARE_FREE[kind]]


def _ordered_methods(rows, reference):
    """Row labels: the reference first, random init last, the rest sorted."""
    labels = sorted({r.label for r in rows})
    first = [l for l in labels if l == reference]
    last = [l for l in labels if l in RANDOM_LABELS]
    return first + [l for l in labels if l not in first and l not in last] + last


def render_summary(rows, comps, reference):
    """One table, method x benchmark: headline metric mean ± std (n) and the verdict against
    the reference method; split into tables of SUMMARY_COLUMNS benchmarks."""
    columns = []   # (name, metric, group text, {label: row})
    for kind in ("detection", "readout"):
        for grows in _groups(rows[kind]):
            if not grows[0].runs:
                continue
            head = grows[0]
            metric = _headline(head)
            if kind == "detection":
                name = str(head.protocol.get("config"))
            else:
                name = (f"readout ({head.protocol.get('readout')}, {head.protocol.get('arch')}, "
                        f"{head.protocol.get('image_size')} px)")
            columns.append([name, metric, _shared_protocol_text(head),
                            {r.label: r for r in grows}])
    md = ["## Summary", ""]
    if not columns:
        return md + ["No finished runs.", ""]
    seen = {}
    for col in columns:   # the same config under two protocols: number them
        seen[col[0]] = seen.get(col[0], 0) + 1
    count = {}
    for col in columns:
        if seen[col[0]] > 1:
            count[col[0]] = count.get(col[0], 0) + 1
            col[0] = f"{col[0]} ({count[col[0]]})"
    verdicts = {}   # (group, metric, method) -> [(reference row label, verdict)]
    for c in comps:
        if c["role"] == "reference":
            verdicts.setdefault((c["group"], c["metric"], c["method"]), []).append(
                (c["vs"], c["comparison"].verdict))
    methods = _ordered_methods([r for col in columns for r in col[3].values()], reference)
    md += [f"Headline metric per benchmark (column): mean ± sample std (n distinct seeds or "
           f"splits), then the verdict against the reference method `{reference}` (one-sided "
           "t test at 5%; the sections below give every interval). \"-\": not run under that "
           "protocol.", ""]

    def cell(label, name, metric, by_label):
        row = by_label.get(label)
        if row is None:
            return "-"
        if not row.runs:
            return row.status()
        stat = row.stat(metric)
        if stat is None:
            return "n/a"
        mean, std, _ = stat
        value = f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}") + f" ({_n_cell(row)})"
        if _matches(row, reference) and not _is_random(row):
            return value + ", reference"
        if _is_random(row):
            return value + ", random init"
        found = verdicts.get((_group_text(row), metric, row.label))
        if not found:
            return value + ", no reference run"
        if len(found) == 1:
            return value + ", " + found[0][1]
        return value + ", " + "; ".join(f"{v} vs {vs}" for vs, v in found)

    for i in range(0, len(columns), SUMMARY_COLUMNS):
        part = columns[i:i + SUMMARY_COLUMNS]
        header = ["method"] + [f"{name}, {_metric_text(metric)}" for name, metric, _, _ in part]
        body = [[label] + [cell(label, name, metric, by_label)
                           for name, metric, _, by_label in part]
                for label in methods if any(label in c[3] for c in part)]
        md += [_md_table(header, body), ""]
    md += ["Benchmarks:", ""]
    md += [f"- {name}: {text}" for name, _, text, _ in columns]
    md.append("")
    return md


def render_comparisons(comps, reference):
    md = ["## Comparisons, measured (difference, 95% interval, verdict)", "",
          f"Each method against the reference method (`{reference}`; `--reference` changes it) "
          "and against random init, within one protocol (the same benchmark, config, training "
          "set and schedule; for readout the same readout protocol). Cells: mean difference "
          "A - B (percentage points; higher is better), its two-sided 95% t interval (paired "
          "over shared seeds or splits when every run of both rows has a partner, Welch "
          "otherwise), and a verdict: **better** / **worse** when a one-sided t test at the 5% "
          "level in that direction says so, else **not resolved**. With a single run on "
          "either side there is no interval: the verdict is **not resolved (1 run)** and "
          "the ordering of the means says nothing.", ""]
    if not comps:
        md += ["No comparisons (no two measured rows under one protocol).", ""]
        return md
    header = ["metric", "method (A)", "vs (B)", "A - B", "95% interval", "test", "n (A, B)",
              "verdict"]
    by_group = {}
    for item in comps:
        by_group.setdefault(item["group"], []).append(item)
    for group, items in by_group.items():
        body = []
        for item in items:
            c = item["comparison"]
            diff, ci, test, verdict = _fmt_comparison(c)
            body.append([_metric_text(item["metric"]), item["method"], item["vs"], diff, ci,
                         test, f"{c.n_a}, {c.n_b}", verdict])
        md += [f"### {group}", "", _md_table(header, body), ""]
    unresolved = sum(1 for item in comps if item["comparison"].verdict.startswith("not"))
    md += [f"{unresolved} of {len(comps)} comparisons are not resolved.", ""]
    return md


def _measured_groups(rows, metrics, plot=None, plot_alt=""):
    """One table per comparison group: its shared protocol as a line, then one row per method
    with the fields that may differ, the metrics, n, seeds and status."""
    md = []
    for grows in _groups(rows):
        title, shared = _group_heading(grows)
        header = ["method"] + _free_header(grows[0].kind) + [_metric_text(m) for m in metrics] \
            + ["n", "seeds", "status"]
        body = [[r.label] + _free_cells(r) + [_cell(r, m) for m in metrics]
                + [_n_cell(r), r.seeds() or "-", r.status()] for r in grows]
        md += [f"### {title}", ""] + ([f"Protocol: {shared}.", ""] if shared else []) + [
            _md_table(header, body), ""]
    if plot:
        md += [f"![{plot_alt}]({plot})", f"Plot: `{plot}`", ""]
    return md


def render_markdown(rows, runs, plots, run_dirs, problems, reference=DEFAULT_REFERENCE):
    n_by = {k: sum(1 for r in runs if r.kind == k and r.status == "finished")
            for k in PROTOCOL_FIELDS}
    not_done = [r for r in runs if r.status != "finished"]
    comps = comparisons(rows, reference)
    md = ["# loco_det benchmark report", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
          + ", ".join(f"`{d}`" for d in run_dirs) + ".",
          f"Finished runs: {n_by['pretrain']} pretraining, {n_by['readout']} readout, "
          f"{n_by['detection']} detection; missing or unfinished: {len(not_done)}.", ""]
    for p in problems:
        md.append(f"- warning: {p}")
    if problems:
        md.append("")
    md += render_summary(rows, comps, reference)
    md += ["## How to read the tables", "",
           "Cells are mean ± sample standard deviation (ddof=1) over the n distinct seeds (or "
           "random splits) of one computation; with n=1 the single value is shown. A row is one "
           "run fingerprint (everything that defines what was computed except the seed; "
           "loco_det/fingerprint.py lists the run-only keys left out) under one protocol, never a "
           "label: two different pretrainings never share a row, and labels that collide get a "
           "suffix naming what differs. The same seed run twice is a repeat, counted once and "
           "flagged in the status column. Missing or unfinished runs are marked as such and "
           "never count as 0. Random init on a fine-tuning protocol trains the whole backbone "
           "from scratch (FREEZE_AT 0 with a trainable norm, see the backbone column); on a "
           "frozen protocol it stays frozen. Each table below is one protocol: the line above "
           "it gives what its rows share.", ""]

    md += ["## Detection (Mask R-CNN), measured", ""]
    det = [r for r in rows["detection"] if r.protocol.get("benchmark") not in OTHER_TASKS]
    if det:
        md += ["AP in %. APbb: box AP, APmk: mask AP.", ""]
        md += _measured_groups(det, ("APbb", "APmk", "APbb50", "APmk50"),
                               plots.get("detection"), "APbb and APmk per method and benchmark")
    else:
        md += ["No detection runs found.", ""]
    md += render_other_tasks(rows["detection"])

    md += ["## Linear readout, measured (top-1 %, frozen encoder, per stage)", ""]
    if rows["readout"]:
        md += _measured_groups(rows["readout"], [f"top1/{s}" for s in STAGES],
                               plots.get("readout"), "Readout top-1 per stage and method")
    else:
        md += ["No readout runs found.", ""]
    md += render_knn(rows["readout"])

    md += ["## Pretraining, measured", ""]
    pre = rows["pretrain"]
    if pre:
        metrics = _metric_names(pre)
        header = ["method", "recipe"] + [
            m.replace("final_loss/", "final loss ").replace("wall_time_s", "wall time s")
            for m in metrics] + ["n", "status"]
        body = [[r.label, str(r.protocol.get("recipe", "-"))]
                + [_cell(r, m, 1 if m == "wall_time_s" else 4) for m in metrics]
                + [_n_cell(r), r.status()] for r in pre]
        md += [_md_table(header, body), ""]
        fields = [k for k in PROTOCOL_FIELDS["pretrain"] if k != "recipe"]
        md += ["Their protocols:", "", _md_table(
            ["method", "recipe"] + [_HEADERS.get(k, k) for k in fields] + ["seeds"],
            [[r.label, str(r.protocol.get("recipe", "-"))]
             + [str(r.protocol.get(k, "-")) for k in fields] + [r.seeds() or "-"]
             for r in pre]), ""]
        if plots.get("pretrain"):
            md += [f"![Per-unit loss curves per method]({plots['pretrain']})",
                   f"Plot: `{plots['pretrain']}`", ""]
    else:
        md += ["No pretraining runs found.", ""]

    md += render_comparisons(comps, reference)

    md += ["## Missing or unfinished runs", ""]
    if not_done:
        body = [[r.kind, r.label, str(r.protocol.get("config") or r.protocol.get("recipe")
                                      or "-"), str(r.seed if r.seed is not None else "-"),
                 r.status, r.path, r.note or "-"] for r in sorted(
                     not_done, key=lambda r: (r.kind, r.label, r.path))]
        md += [_md_table(["kind", "method", "config", "seed", "status", "path", "note"], body), ""]
    else:
        md += ["None.", ""]

    md += ["## Plots", ""]
    if plots:
        md += [f"- `{p}`" for p in plots.values()]
    else:
        md.append("No plots (no finished runs).")
    md.append("")

    md += ["## Paper's reported numbers (not measured here)", "",
           f"From {PAPER_CITATION}; copied in loco_det/paper_reference.yaml. These are **not** "
           "results of this suite and are never mixed into the measured tables above; they "
           "were obtained at full ImageNet/COCO/Cityscapes scale, one run each.", ""]
    md += render_paper_differences()
    for table in PAPER_TABLES:
        md += [f"### {table['title']} (paper)", "", _md_table(table["header"], table["rows"]), ""]
    return "\n".join(md)


def render_paper_differences():
    return ["### The paper's differences (not measured here)", "",
            "The differences as published, to read beside the measured comparisons above (no "
            "interval is given in the paper).", "",
            _md_table(["table", "pretraining", "difference", "benchmark", "metric", "paper"],
                      paper_differences()), ""]


def render_knn(readout_rows):
    """Weighted kNN top-1 per stage (knn.json): one table per k, one row per readout row and
    kNN protocol."""
    entries = []
    for row in readout_rows:
        groups = {}
        for run in row.runs:
            if "knn" in run.protocol:
                groups.setdefault(run.protocol["knn"], []).append(run)
        for proto, runs in groups.items():
            entries.append((row, proto, Row("readout", row.label, row.protocol, runs=runs)))
    if not entries:
        return []
    md = ["## kNN readout, measured (top-1 %, frozen encoder, per stage)", "",
          "Weighted kNN (InstDisc / DINO): L2-normalised pooled features, k nearest training "
          "images vote with exp(cos / T).", ""]
    for k in KNN_KS:
        header = ["method", "pretraining", "arch", "kNN protocol"] + list(STAGES) + [
            "n", "seeds"]
        body = [[row.label, str(row.protocol.get("pretraining", "-")),
                 str(row.protocol.get("arch", "-")), proto]
                + [_cell(sub, f"knn/k{k}/{s}") for s in STAGES]
                + [str(len(sub.runs)), sub.seeds() or "-"] for row, proto, sub in entries]
        md += [f"### k = {k}", "", _md_table(header, body), ""]
    return md


def render_other_tasks(det_rows):
    """VOC detection and semantic-segmentation rows, each benchmark in its own section."""
    md = []
    for bench, (title, note, metrics) in OTHER_TASKS.items():
        brows = [r for r in det_rows if r.protocol.get("benchmark") == bench]
        if brows:
            md += [f"## {title}", "", note, ""] + _measured_groups(brows, metrics)
    return md


CSV_FIELDS = ["section", "method", "metric", "mean", "std", "n", "seeds", "repeats", "status",
              "n_missing", "n_unfinished", "fingerprint"] + sorted(
                  {f for fs in PROTOCOL_FIELDS.values() for f in fs}) + ["paths"]
COMPARISON_FIELDS = ["kind", "protocol", "metric", "method", "vs", "role", "diff", "ci_low",
                     "ci_high", "halfwidth", "test", "df", "n_a", "n_b", "verdict"]


def render_csv(rows):
    """One line per (row, metric) with full-precision numbers; missing rows have empty mean."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for kind in ("pretrain", "readout", "detection"):
        krows = rows[kind]
        metrics = _metric_names(krows) or (["APbb", "APmk"] if kind == "detection" else
                                           [f"top1/{s}" for s in STAGES] if kind == "readout"
                                           else ["final_loss/unit1"])
        for row in krows:
            for m in metrics:
                stat = row.stat(m)
                if row.runs and stat is None:
                    continue
                rec = {"section": f"measured_{kind}", "method": row.label, "metric": m,
                       "status": row.status(), "seeds": row.seeds(),
                       "repeats": ";".join(f"{k}x{v}" for k, v in row.repeats().items()),
                       "fingerprint": ";".join(sorted({r.fingerprint for r in row.runs})),
                       "n_missing": sum(o.status == "missing" for o in row.others),
                       "n_unfinished": sum(o.status == "unfinished" for o in row.others),
                       "paths": ";".join(r.path for r in row.runs + row.others)}
                if stat is not None:
                    rec.update(mean=repr(stat[0]), std="" if stat[1] is None else repr(stat[1]),
                               n=stat[2])
                else:
                    rec.update(mean="", std="", n=0)
                rec.update({k: row.protocol.get(k, "") for k in PROTOCOL_FIELDS[kind]})
                w.writerow(rec)
    return buf.getvalue()


def render_comparisons_csv(comps):
    """comparisons.csv: one line per comparison with full-precision numbers."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COMPARISON_FIELDS, lineterminator="\n")
    w.writeheader()
    for item in comps:
        c = item["comparison"]
        w.writerow({"kind": item["kind"], "protocol": item["group"], "metric": item["metric"],
                    "method": item["method"], "vs": item["vs"], "role": item["role"],
                    "diff": repr(c.diff), "ci_low": "" if c.low is None else repr(c.low),
                    "ci_high": "" if c.high is None else repr(c.high),
                    "halfwidth": "" if c.halfwidth is None else repr(c.halfwidth),
                    "test": c.test, "df": "" if c.df is None else repr(float(c.df)),
                    "n_a": c.n_a, "n_b": c.n_b, "verdict": c.verdict})
    return buf.getvalue()


def render_paper_csv():
    """The paper's rows, in their own file: report.csv holds measured numbers only."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "table", "row", "column", "value"])
    for table in PAPER_TABLES:
        keys = table.get("keys", 2 if table["header"][0] == "pretraining" else 1)
        for row in table["rows"]:
            name = " ".join(c for c in row[:keys] if c != "-")
            for col, value in zip(table["header"][keys:], row[keys:]):
                w.writerow(["paper (not measured here)", table["title"], name, col, value])
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots

def _save(fig, path):
    """savefig to a temp file then rename: a reader never sees half a PNG."""
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def _subplots(plt, n):
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.6 * nrows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _by_protocol(rows):
    """One panel per comparison group (rows compared with each other)."""
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault(group_key(row), []).append(row)
    return groups


def _bars(ax, xs, stats_list, width, **kw):
    """Bars of means. Error bars (± sample std) only where n >= 2; n = 1 bars are hatched and
    marked "1 run": a zero-width error bar would read as certainty."""
    heights = [s[0] if s else 0 for s in stats_list]
    bars = ax.bar(xs, heights, width, **kw)
    for bar, x, st in zip(bars, xs, stats_list):
        if not st:
            continue
        if st[2] >= 2:
            ax.errorbar([x], [st[0]], yerr=[st[1]], fmt="none", ecolor="black", capsize=2,
                        lw=0.8)
        else:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
            ax.annotate("1 run", (x, st[0]), ha="center", va="bottom", fontsize=7,
                        rotation=90, xytext=(0, 1), textcoords="offset points")
    return bars


def _legend_below(ax, ncol):
    """Legend under the axes, never over the bars or curves it explains."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol,
              frameon=False)


def make_plots(rows, out_dir):
    """Write the PNGs that have data; returns {kind: relative path} of those written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    pre = [r for r in rows["pretrain"] if any(run.curves for run in r.runs)]
    if pre:
        fig, axes = _subplots(plt, len(pre))
        for ax, row in zip(axes, pre):
            for i, run in enumerate(sorted(row.runs, key=lambda r: str(r.seed))):
                for j, (unit, (xs, ys)) in enumerate(sorted(run.curves.items())):
                    ax.plot(xs, ys, color=f"C{j}", alpha=1.0 if i == 0 else 0.5, lw=1.2,
                            marker="o" if len(xs) < 20 else None, ms=3,   # short runs: visible
                            label=unit if i == 0 else None)
            ax.set_title(f"{row.label} ({row.protocol.get('recipe')}, n={len(row.runs)})",
                         fontsize=10)
            ax.set_xlabel("step", fontsize=9)
            ax.set_ylabel("loss", fontsize=9)
            _legend_below(ax, ncol=4)
        fig.suptitle("Per-unit pretraining loss per method")
        _save(fig, os.path.join(out_dir, PLOTS["pretrain"]))
        plt.close(fig)
        written["pretrain"] = PLOTS["pretrain"]

    groups = _by_protocol(rows["readout"])
    if groups:
        fig, axes = _subplots(plt, len(groups))
        for ax, (proto, grows) in zip(axes, groups.items()):
            width = 0.8 / len(grows)
            for i, row in enumerate(grows):
                values = [row.stat(f"top1/{s}") for s in STAGES]
                xs = [k + i * width for k in range(len(STAGES))]
                n = len(row.by_seed())
                _bars(ax, xs, values, width, color=f"C{i}",
                      label=f"{row.label} ({row.protocol.get('pretraining')}, n={n})")
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(STAGES))], list(STAGES),
                          fontsize=9)
            ax.set_ylabel("top-1 %", fontsize=9)
            p = grows[0].protocol
            ax.set_title(f"{p.get('arch')}, {p.get('readout')} readout:\n"
                         f"{p.get('readout_epochs')} epochs, lr {p.get('lr')}, "
                         f"{p.get('image_size')} px", fontsize=10)
            _legend_below(ax, ncol=1)
        fig.suptitle("Linear readout top-1 per stage and method\n(error bars: ± std over "
                     "n >= 2 seeds; hatched: a single run, no error bar)", fontsize=11)
        _save(fig, os.path.join(out_dir, PLOTS["readout"]))
        plt.close(fig)
        written["readout"] = PLOTS["readout"]

    groups = _by_protocol([r for r in rows["detection"]
                           if r.protocol.get("benchmark") not in OTHER_TASKS])
    if groups:
        fig, axes = _subplots(plt, len(groups))
        for ax, (proto, grows) in zip(axes, groups.items()):
            xs = list(range(len(grows)))
            for j, metric in enumerate(("APbb", "APmk")):
                _bars(ax, [x + j * 0.4 for x in xs], [r.stat(metric) for r in grows], 0.4,
                      color=f"C{j}", label=metric)
            ax.set_xticks([x + 0.2 for x in xs],
                          [f"{r.label}\nn={len(r.by_seed())}" for r in grows], fontsize=8,
                          rotation=30 if len(grows) > 3 else 0,
                          ha="right" if len(grows) > 3 else "center")
            ax.set_ylabel("AP %", fontsize=9)
            p = grows[0].protocol
            ax.set_title(f"{p.get('benchmark')}: {p.get('config')}\n{p.get('schedule')}, "
                         f"batch {p.get('global_batch')}", fontsize=10)
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.suptitle("Mask R-CNN APbb / APmk per method and benchmark\n(error bars: ± std "
                     "over n >= 2 seeds; hatched: a single run, no error bar)", fontsize=11)
        _save(fig, os.path.join(out_dir, PLOTS["detection"]))
        plt.close(fig)
        written["detection"] = PLOTS["detection"]
    return written


# ----------------------------------------------------------------------------- entry point

def write_report(run_dirs, out_dir, reference=DEFAULT_REFERENCE):
    """Collect, then write plots, CSVs and report.md (last, so the md never names a plot that
    is not there). `reference`: the method every other is compared with. Returns (path of
    report.md, rows)."""
    runs, manifests, problems = collect(run_dirs)
    if not runs and not manifests:
        raise LocoError("no runs found under " + ", ".join(run_dirs)
                        + " (expected run_info.json, summary.json, readout.json or results.json)")
    rows = build_rows(runs)
    plots_dir = os.path.join(out_dir, "plots")
    if os.path.islink(plots_dir):   # the other outputs are written atomically (links replaced)
        raise LocoError(f"{plots_dir} is a symbolic link; refusing to write the plots through it")
    check_no_links(plots_dir, "plots folder")
    os.makedirs(out_dir, exist_ok=True)
    plots = make_plots(rows, out_dir)
    with atomic_write(os.path.join(out_dir, "report.csv"), "w") as f:
        f.write(render_csv(rows))
    with atomic_write(os.path.join(out_dir, "comparisons.csv"), "w") as f:
        f.write(render_comparisons_csv(comparisons(rows, reference)))
    with atomic_write(os.path.join(out_dir, "paper_reference.csv"), "w") as f:
        f.write(render_paper_csv())
    md_path = os.path.join(out_dir, "report.md")
    with atomic_write(md_path, "w") as f:
        f.write(render_markdown(rows, runs, plots, run_dirs, problems, reference))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return md_path, rows
