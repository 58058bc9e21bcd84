"""Benchmark report: collect pretraining, readout and detection runs into report.md, report.csv
and PNG plots.

Why it is built this way:
- Numbers are only ever averaged within one *protocol* (config, schedule, frozen or fine-tuned,
  world size, global batch, ...). Each row carries its protocol, so two learning rules are never
  compared across different settings without the reader seeing it.
- A run that is missing or unfinished is shown as such, never as 0: a zero in a results table
  reads as a measurement.
- The paper's numbers (REFERENCE.md section 2) are printed in their own section and file, never
  in a measured table, so a reader cannot mistake them for ours.
- Labels: the method label of a run is what `tools/run_benchmark.py` records in its manifest
  (`benchmark.json`) and passes to train_net as LOCO_DET.LABEL; without a manifest it falls back
  to the method named in the run's own files.

Input formats: docs/formats.md. Output: DIR/report.md, DIR/report.csv, DIR/paper_reference.csv,
DIR/plots/*.png, each written atomically.
"""
import csv
import io
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import yaml

from .utils import LocoError, atomic_write

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

# REFERENCE.md section 2, copied as published (LoCo paper, NeurIPS 2020). Cells: top-1 or
# "APbb / APmk".
PAPER_TABLES = [
    {"title": "ImageNet linear readout, top-1 % (800 epochs)",
     "header": ["method", "ResNet-50", "ShuffleNet v2-50"],
     "rows": [["SimCLR (end-to-end)", "69.8", "69.1"], ["GIM", "64.7", "63.5"],
              ["LoCo", "69.5", "69.3"]]},
    {"title": "Mask R-CNN, frozen pretrained backbone (readout), R50-FPN; COCO 1x, "
              "Cityscapes 64 epochs; APbb / APmk",
     "header": ["pretraining", "method", "COCO", "Cityscapes"],
     "rows": [["supervised", "-", "33.9 / 31.3", "33.2 / 27.1"],
              ["100 ep", "SimCLR", "32.2 / 29.9", "33.2 / 28.6"],
              ["100 ep", "GIM", "27.7 / 25.7", "30.0 / 24.6"],
              ["100 ep", "LoCo", "32.6 / 30.1", "33.2 / 28.4"],
              ["800 ep", "SimCLR", "34.8 / 32.2", "34.8 / 30.1"],
              ["800 ep", "GIM", "29.3 / 27.0", "30.7 / 26.0"],
              ["800 ep", "LoCo", "34.5 / 32.0", "34.2 / 29.5"]]},
    {"title": "Mask R-CNN fine-tuned with few COCO labels (R50-FPN, conv1+res2 frozen; COCO-10K "
              "60k it, COCO-1K 15k it; mean of 5 splits); APbb / APmk",
     "header": ["pretraining", "method", "COCO-10K", "COCO-1K"],
     "rows": [["-", "random init", "23.5 / 22.0", "2.5 / 2.5"],
              ["-", "supervised", "26.0 / 23.8", "10.4 / 10.1"],
              ["100 ep", "SimCLR", "25.6 / 23.9", "11.3 / 11.4"],
              ["100 ep", "GIM", "22.6 / 20.8", "9.7 / 9.6"],
              ["100 ep", "LoCo", "26.1 / 24.2", "11.7 / 11.8"],
              ["800 ep", "SimCLR", "27.2 / 25.2", "13.9 / 14.1"],
              ["800 ep", "GIM", "24.4 / 22.4", "11.5 / 11.7"],
              ["800 ep", "LoCo", "27.8 / 25.6", "13.9 / 13.8"]]},
]

# Protocol fields shown in every measured row, per kind (display names).
PROTOCOL_FIELDS = {
    "pretrain": ("recipe", "arch", "epochs", "world_size", "global_batch"),
    "readout": ("pretraining", "arch", "readout", "readout_epochs", "lr", "batch_size",
                "image_size", "train_images"),
    "detection": ("benchmark", "config", "train_set", "schedule", "backbone", "world_size",
                  "global_batch"),
}


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

    def values(self, metric):
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def stat(self, metric):
        """(mean, sample std or None, n) over the finished runs; None when no run has it."""
        vals = self.values(metric)
        if not vals:
            return None
        std = statistics.stdev(vals) if len(vals) > 1 else None
        return statistics.fmean(vals), std, len(vals)

    def seeds(self):
        return ",".join(str(r.seed) for r in sorted(self.runs, key=lambda r: str(r.seed)))

    def status(self):
        if not self.runs:
            kinds = sorted({o.status for o in self.others})
            return "/".join(kinds) if kinds else "missing"
        counts = {}
        for o in self.others:
            counts[o.status] = counts.get(o.status, 0) + 1
        if not counts:
            return "ok"
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


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


def _read_pretrain(d, files):
    info = _read_json(os.path.join(d, "run_info.json")) if "run_info.json" in files else {}
    cfg = _read_yaml(os.path.join(d, "config.yaml"))
    method = info.get("method") or _get(cfg, "MODEL.METHOD") or "?"
    recipe = _stem(info.get("config_file")) or "?"
    protocol = {"recipe": recipe, "arch": info.get("arch") or _get(cfg, "MODEL.ARCH", "?"),
                "epochs": info.get("epochs", _get(cfg, "OPTIM.EPOCHS", "?")),
                "world_size": info.get("world_size", "?"),
                "global_batch": info.get("global_batch", _get(cfg, "OPTIM.BATCH_SIZE", "?"))}
    run = Run("pretrain", d, "unfinished", method, protocol, seed=_get(cfg, "SEED"))
    run.curves = _read_curves(os.path.join(d, "metrics.jsonl"))
    if "summary.json" not in files:
        run.note = "no summary.json"
        return run
    summary = _read_json(os.path.join(d, "summary.json"))
    if summary.get("finished") is not True:
        run.note = "summary.json without finished=true"
        return run
    run.status = "finished"
    for unit, loss in sorted((summary.get("final_losses") or {}).items()):
        run.metrics[f"final_loss/{unit}"] = float(loss)
    if isinstance(summary.get("wall_time_s"), (int, float)):
        run.metrics["wall_time_s"] = float(summary["wall_time_s"])
    return run


def _read_curves(path):
    """Per-unit loss curves from metrics.jsonl; a torn last line (run killed mid-write) is
    ignored."""
    curves = {}
    if not os.path.isfile(path):
        return curves
    with open(path) as f:
        for i, line in enumerate(f):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = rec.get("step", i)
            for key, value in rec.items():
                if key.startswith("loss/") and isinstance(value, (int, float)):
                    xs, ys = curves.setdefault(key[5:], ([], []))
                    xs.append(step)
                    ys.append(float(value))
    return curves


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


def _read_readout(d):
    r = _read_json(os.path.join(d, "readout.json"))
    p = r.get("protocol") or {}
    method = r.get("method") or "?"
    protocol = {"pretraining": "random init" if method == "random"
                else _pretraining_of(r.get("checkpoint")),
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
    seed = None
    ckpt_cfg = os.path.join(_run_dir_of(r.get("checkpoint") or ""), "config.yaml")
    if r.get("checkpoint") and os.path.isfile(ckpt_cfg):
        seed = _get(_read_yaml(ckpt_cfg), "SEED")
    run.seed = seed if seed is not None else p.get("seed", "-")   # pretraining seed first
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
    backbone = ("?" if frozen is None else "frozen" if frozen else "fine-tuned") + (
        f" (FREEZE_AT {freeze_at})" if freeze_at is not None else "")
    config = p.get("config_name") or _get(cfg, "LOCO_DET.CONFIG_NAME") or \
        _stem(_argv_value(argv, "--config-file")) or "?"
    max_iter = p.get("max_iter", _get(cfg, "SOLVER.MAX_ITER"))
    test_sets = str(_get(cfg, "DATASETS.TEST", ""))
    benchmark = p.get("benchmark") or _get(cfg, "LOCO_DET.BENCHMARK") or (
        "voc" if "voc_" in test_sets else
        "cityscapes_sem_seg" if "cityscapes" in test_sets and "sem_seg" in test_sets else
        "cityscapes" if "cityscapes" in test_sets else "coco" if cfg else "?")
    protocol = {"benchmark": benchmark, "config": config,
                "train_set": _train_set(_get(cfg, "DATASETS.TRAIN")),
                "schedule": f"{max_iter} it" if max_iter is not None else "?",
                "backbone": backbone,
                "world_size": p.get("world_size", info.get("world_size", "?")),
                "global_batch": p.get("global_batch", _get(cfg, "SOLVER.IMS_PER_BATCH", "?"))}
    label = ((results or {}).get("method") or _get(cfg, "LOCO_DET.LABEL")
             or _get(cfg, "LOCO_DET.RESOLVED_METHOD") or _argv_value(argv, "LOCO_DET.LABEL")
             or "?")
    split = re.search(r"seed(\d+)", str(_get(cfg, "DATASETS.TRAIN", "")))
    seed = p.get("seed", _get(cfg, "SEED"))
    if split and str(split.group(1)) != str(seed):
        seed = f"split{split.group(1)}/seed{seed}"
    run = Run("detection", d, "unfinished", label, protocol, seed=seed, note=note)
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
        if not os.path.isdir(root):
            problems.append(f"{root}: not a directory")
            continue
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


def build_rows(runs):
    """Rows per kind: finished runs grouped by (label, full protocol); missing and unfinished
    runs are counted in the row of their label and config when exactly one such row exists,
    else they get a row of their own (with no numbers)."""
    rows = {}
    for run in runs:
        if run.status == "finished":
            key = (run.kind, run.label, _protocol_key(run))
            rows.setdefault(key, Row(run.kind, run.label, dict(run.protocol))).runs.append(run)
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
    for kind in out:   # config first, so a missing run sits beside its config's measured rows
        out[kind].sort(key=lambda r: (str(r.protocol.get("config", "")), tuple(
            str(r.protocol.get(k, "")) for k in PROTOCOL_FIELDS[kind]), r.label))
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
    n = len(row.runs)
    return str(n) if not row.others else f"{n} of {n + len(row.others)}"


def _protocol_cells(row):
    return [str(row.protocol.get(k, "-")) for k in PROTOCOL_FIELDS[row.kind]]


_HEADERS = {"readout": "protocol", "world_size": "world size", "global_batch": "global batch",
            "readout_epochs": "readout epochs", "batch_size": "batch", "image_size": "image px",
            "train_images": "train images", "train_set": "train set"}


def _protocol_header(kind):
    return [_HEADERS.get(k, k) for k in PROTOCOL_FIELDS[kind]]


def render_markdown(rows, runs, plots, run_dirs, problems):
    n_by = {k: sum(1 for r in runs if r.kind == k and r.status == "finished")
            for k in PROTOCOL_FIELDS}
    not_done = [r for r in runs if r.status != "finished"]
    md = ["# loco_det benchmark report", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
          + ", ".join(f"`{d}`" for d in run_dirs) + ".",
          f"Finished runs: {n_by['pretrain']} pretraining, {n_by['readout']} readout, "
          f"{n_by['detection']} detection; missing or unfinished: {len(not_done)}.", "",
          "Cells are mean ± sample standard deviation (ddof=1) over the n finished runs "
          "(seeds or random splits) of one method under one protocol; with n=1 the single "
          "value is shown. Runs under different protocols (config, schedule, frozen or "
          "fine-tuned, world size, global batch) are never averaged together: each row states "
          "its protocol. Missing or unfinished runs are marked as such and never count as 0.", ""]
    for p in problems:
        md.append(f"- warning: {p}")
    if problems:
        md.append("")

    md += ["## Detection (Mask R-CNN), measured", ""]
    det = [r for r in rows["detection"] if r.protocol.get("benchmark") not in OTHER_TASKS]
    if det:
        md.append("AP in %. APbb: box AP, APmk: mask AP.")
        md.append("")
        header = ["method"] + _protocol_header("detection") + ["APbb", "APmk", "APbb50", "APmk50",
                                                              "n", "seeds", "status"]
        body = [[r.label] + _protocol_cells(r)
                + [_cell(r, m) for m in ("APbb", "APmk", "APbb50", "APmk50")]
                + [_n_cell(r), r.seeds() or "-", r.status()] for r in det]
        md += [_md_table(header, body), ""]
        if plots.get("detection"):
            md += [f"![APbb and APmk per method and benchmark]({plots['detection']})",
                   f"Plot: `{plots['detection']}`", ""]
    else:
        md += ["No detection runs found.", ""]

    md += ["## Linear readout, measured (top-1 %, frozen encoder, per stage)", ""]
    ro = rows["readout"]
    if ro:
        header = ["method"] + _protocol_header("readout") + list(STAGES) + ["n", "seeds",
                                                                            "status"]
        body = [[r.label] + _protocol_cells(r) + [_cell(r, f"top1/{s}") for s in STAGES]
                + [_n_cell(r), r.seeds() or "-", r.status()] for r in ro]
        md += [_md_table(header, body), ""]
        if plots.get("readout"):
            md += [f"![Readout top-1 per stage and method]({plots['readout']})",
                   f"Plot: `{plots['readout']}`", ""]
    else:
        md += ["No readout runs found.", ""]
    md += render_knn(rows["readout"]) + render_other_tasks(rows["detection"])

    md += ["## Pretraining, measured", ""]
    pre = rows["pretrain"]
    if pre:
        metrics = _metric_names(pre)
        header = ["method"] + _protocol_header("pretrain") + [
            m.replace("final_loss/", "final loss ").replace("wall_time_s", "wall time s")
            for m in metrics] + ["n", "seeds", "status"]
        body = [[r.label] + _protocol_cells(r)
                + [_cell(r, m, 1 if m == "wall_time_s" else 4) for m in metrics]
                + [_n_cell(r), r.seeds() or "-", r.status()] for r in pre]
        md += [_md_table(header, body), ""]
        if plots.get("pretrain"):
            md += [f"![Per-unit loss curves per method]({plots['pretrain']})",
                   f"Plot: `{plots['pretrain']}`", ""]
    else:
        md += ["No pretraining runs found.", ""]

    md += ["## Missing or unfinished runs", ""]
    if not_done:
        body = [[r.kind, r.label, str(r.protocol.get("config") or r.protocol.get("recipe")
                                      or "-"), str(r.seed if r.seed is not None else "-"),
                 r.status, r.path, r.note or "-"] for r in sorted(
                     not_done, key=lambda r: (r.kind, r.label, r.path))]
        md += [_md_table(["kind", "method", "config", "seed", "status", "path", "note"], body), ""]
    else:
        md += ["None.", ""]

    md += ["## Paper's reported numbers (not measured here)", "",
           "Copied from the LoCo paper (NeurIPS 2020, arXiv 2008.01342) for orientation. These "
           "are **not** results of this suite and are never mixed into the measured tables "
           "above; they were obtained at full ImageNet/COCO/Cityscapes scale.", ""]
    for table in PAPER_TABLES:
        md += [f"### {table['title']} (paper)", "", _md_table(table["header"], table["rows"]), ""]

    md += ["## Plots", ""]
    if plots:
        md += [f"- `{p}`" for p in plots.values()]
    else:
        md.append("No plots (no finished runs).")
    md.append("")
    return "\n".join(md)


def render_knn(readout_rows):
    """Weighted kNN top-1 per stage (knn.json), one row per readout row and kNN protocol."""
    body = []
    for row in readout_rows:
        groups = {}
        for run in row.runs:
            if "knn" in run.protocol:
                groups.setdefault(run.protocol["knn"], []).append(run)
        for proto, runs in groups.items():
            sub = Row("readout", row.label, row.protocol, runs=runs)
            body.append([row.label, str(row.protocol.get("pretraining", "-")),
                         str(row.protocol.get("arch", "-")), proto]
                        + [_cell(sub, f"knn/k{k}/{s}") for k in KNN_KS for s in STAGES]
                        + [str(len(runs)), sub.seeds() or "-"])
    if not body:
        return []
    header = ["method", "pretraining", "arch", "kNN protocol"] + [
        f"k{k} {s}" for k in KNN_KS for s in STAGES] + ["n", "seeds"]
    return ["## kNN readout, measured (top-1 %, frozen encoder, per stage)", "",
            "Weighted kNN (InstDisc / DINO): L2-normalised pooled features, k nearest training "
            "images vote with exp(cos / T).", "", _md_table(header, body), ""]


def render_other_tasks(det_rows):
    """VOC detection and semantic-segmentation rows, each benchmark in its own table."""
    md = []
    for bench, (title, note, metrics) in OTHER_TASKS.items():
        brows = [r for r in det_rows if r.protocol.get("benchmark") == bench]
        if not brows:
            continue
        header = ["method"] + _protocol_header("detection") + list(metrics) + [
            "n", "seeds", "status"]
        body = [[r.label] + _protocol_cells(r) + [_cell(r, m) for m in metrics]
                + [_n_cell(r), r.seeds() or "-", r.status()] for r in brows]
        md += [f"## {title}", "", note, "", _md_table(header, body), ""]
    return md


CSV_FIELDS = ["section", "method", "metric", "mean", "std", "n", "seeds", "status",
              "n_missing", "n_unfinished"] + sorted({f for fs in PROTOCOL_FIELDS.values()
                                                      for f in fs}) + ["paths"]


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


def render_paper_csv():
    """The paper's rows, in their own file: report.csv holds measured numbers only."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "table", "row", "column", "value"])
    for table in PAPER_TABLES:
        keys = 2 if table["header"][0] == "pretraining" else 1
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
        fig.savefig(f, format="png", dpi=90, bbox_inches="tight")


def _subplots(plt, n):
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _by_protocol(rows):
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault(tuple(_protocol_cells(row)[1 if row.kind == "readout" else 0:]),
                              []).append(row)
    return groups


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
                         fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("NT-Xent loss")
            ax.legend(fontsize=7)
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
                stats = [row.stat(f"top1/{s}") for s in STAGES]
                xs = [k + i * width for k in range(len(STAGES))]
                ax.bar(xs, [s[0] if s else 0 for s in stats], width,
                       yerr=[s[1] or 0 if s else 0 for s in stats], capsize=2,
                       label=f"{row.label} ({row.protocol.get('pretraining')}, n={len(row.runs)})")
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(STAGES))], list(STAGES))
            ax.set_ylabel("top-1 %")
            ax.set_title(f"{proto[0]}, {proto[1]} readout: {proto[2]} epochs, lr {proto[3]}, "
                         f"{proto[5]} px", fontsize=8)
            ax.legend(fontsize=6)
        fig.suptitle("Linear readout top-1 per stage and method")
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
                stats = [r.stat(metric) for r in grows]
                ax.bar([x + j * 0.4 for x in xs], [s[0] if s else 0 for s in stats], 0.4,
                       yerr=[s[1] or 0 if s else 0 for s in stats], capsize=2, label=metric)
            ax.set_xticks([x + 0.2 for x in xs],
                          [f"{r.label}\nn={len(r.runs)}" for r in grows], fontsize=7)
            ax.set_ylabel("AP %")
            ax.set_title(f"{proto[0]}: {proto[1]}\n{proto[3]}, {proto[4]}, batch {proto[6]}",
                         fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("Mask R-CNN APbb / APmk per method and benchmark")
        _save(fig, os.path.join(out_dir, PLOTS["detection"]))
        plt.close(fig)
        written["detection"] = PLOTS["detection"]
    return written


# ----------------------------------------------------------------------------- entry point

def write_report(run_dirs, out_dir):
    """Collect, then write plots, CSVs and report.md (last, so the md never names a plot that
    is not there). Returns (path of report.md, rows)."""
    runs, manifests, problems = collect(run_dirs)
    if not runs and not manifests:
        raise LocoError("no runs found under " + ", ".join(run_dirs)
                        + " (expected run_info.json, summary.json, readout.json or results.json)")
    rows = build_rows(runs)
    os.makedirs(out_dir, exist_ok=True)
    plots = make_plots(rows, out_dir)
    with atomic_write(os.path.join(out_dir, "report.csv"), "w") as f:
        f.write(render_csv(rows))
    with atomic_write(os.path.join(out_dir, "paper_reference.csv"), "w") as f:
        f.write(render_paper_csv())
    md_path = os.path.join(out_dir, "report.md")
    with atomic_write(md_path, "w") as f:
        f.write(render_markdown(rows, runs, plots, run_dirs, problems))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return md_path, rows
