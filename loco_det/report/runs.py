"""Collecting runs: every run folder under the given roots, read through its records
(loco_det/records.py), plus the runs a grid's manifest expected that have no folder."""
import functools
import json
import os
from dataclasses import dataclass, field

import yaml

from .. import fingerprint as fp
from ..pretrain import rules
from ..records import (MANIFEST, RANDOM_METHOD, STAGES, DetectionResults, KnnRecord,
                       PretrainRunInfo, PretrainSummary, ReadoutRecord, RecordError, RunInfo,
                       read_json)
from ..utils import LocoError, get_dotted as _get

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_METRICS = (("APbb", "bbox", "AP"), ("APmk", "segm", "AP"), ("APbb50", "bbox", "AP50"),
               ("APbb75", "bbox", "AP75"), ("APmk50", "segm", "AP50"), ("APmk75", "segm", "AP75"),
               ("mIoU", "sem_seg", "mIoU"), ("iIoU", "sem_seg", "iIoU"))
# Benchmarks that are not Mask R-CNN: their own tables (other metrics), not in the AP plot.

# Protocol fields shown in every measured row, per kind (display names).
PROTOCOL_FIELDS = {
    "pretrain": ("dataset", "recipe", "arch", "decoder", "epochs", "world_size",
                 "global_batch"),
    "readout": ("dataset", "pretraining", "decoder", "arch", "readout", "readout_epochs", "lr",
                "batch_size", "image_size", "train_images"),
    "detection": ("dataset", "benchmark", "config", "train_set", "schedule", "weights",
                  "decoder", "backbone", "world_size", "global_batch"),
}
# Protocol fields that may differ between the rows being compared (the learning rule, its


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
    knn_curves: dict = field(default_factory=dict)  # pretrain: "k20/res5" -> ([steps], [top-1])
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



def _default(value, default):
    """`value` unless the record left it unset (an older run's file)."""
    return default if value is None else value


def _read_yaml(path):
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}

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


@functools.lru_cache(maxsize=None)
def _rule_needs(method):
    """What the rule `method` declares (pretrain/rules.py); the defaults (MODEL.DECODER applies,
    no labels) for a rule that cannot be found here, e.g. a plug-in not installed where the
    report runs."""
    try:
        return rules.rule_needs(method)
    except rules.RuleError:
        return rules.RuleNeeds()


def _decoder(cfg):
    """'conv C, mlp M' of a pretraining config's MODEL.DECODER, '?' when not recorded; the
    rule's own head where MODEL.DECODER does not apply to it."""
    method = _get(cfg, "MODEL.METHOD")
    if method is not None and not _rule_needs(method).decoder_options:
        return _rule_needs(method).head or "?"
    conv, mlp = _get(cfg, "MODEL.DECODER.CONV_BLOCKS"), _get(cfg, "MODEL.DECODER.MLP_LAYERS")
    if conv is None and mlp is None:
        return "?"
    return f"conv {'?' if conv is None else conv}, mlp {'?' if mlp is None else mlp}"


def _pretrain_identity(info, cfg):
    """(fingerprint, flat identity) of a pretraining run: the fingerprint its run_info.json
    records, else one computed from its config.yaml; ("", {}) without either."""
    identity = fp.pretrain_identity(cfg) if cfg else {}
    recorded = info.fingerprint if info is not None else None
    if recorded:
        return str(recorded), identity
    return (fp.digest(identity) if identity else ""), identity


def _read_pretrain(d, files):
    info = (PretrainRunInfo.read(os.path.join(d, PretrainRunInfo.FILE))
            if PretrainRunInfo.FILE in files else PretrainRunInfo())
    cfg = _read_yaml(os.path.join(d, "config.yaml"))
    method = info.method or _get(cfg, "MODEL.METHOD") or "?"
    recipe = _stem(info.config_file) or "?"
    protocol = {"dataset": dataset_of_folder(_get(cfg, "DATA.ROOT")),
                "recipe": recipe, "arch": info.arch or _get(cfg, "MODEL.ARCH", "?"),
                "decoder": _decoder(cfg),
                "epochs": _default(info.epochs, _get(cfg, "OPTIM.EPOCHS", "?")),
                "world_size": _default(info.world_size, "?"),
                "global_batch": _default(info.global_batch, _get(cfg, "OPTIM.BATCH_SIZE", "?"))}
    run = Run("pretrain", d, "unfinished", method, protocol, seed=_get(cfg, "SEED"))
    run.method = method
    run.fingerprint, run.identity = _pretrain_identity(info, cfg)
    run.seed_parts = {"seed": run.seed}
    run.curves, bad, total = _read_curves(os.path.join(d, "metrics.jsonl"), run.knn_curves)
    if bad:
        run.note = f"metrics.jsonl: {bad} of {total} lines unreadable"
    if PretrainSummary.FILE not in files:
        run.note = "; ".join(filter(None, ["no summary.json", run.note]))
        return run
    summary = PretrainSummary.read(os.path.join(d, PretrainSummary.FILE))
    if summary.finished is not True:
        run.note = "; ".join(filter(None, ["summary.json without finished=true", run.note]))
        return run
    run.status = "finished"
    for unit, loss in sorted((summary.final_losses or {}).items()):
        run.metrics[f"final_loss/{unit}"] = float(loss)
    if isinstance(summary.wall_time_s, (int, float)):
        run.metrics["wall_time_s"] = float(summary.wall_time_s)
    return run


def _read_curves(path, knn_curves=None):
    """(per-unit loss curves, unreadable lines, lines) from metrics.jsonl; the kNN monitor's
    records (RUN.KNN_PERIOD: "knn/k20/res5" ...) go into `knn_curves` when given. Unreadable
    lines are counted, never silently dropped: the run's row says how many (a torn last line of
    a killed run is one)."""
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
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if key.startswith("loss/"):
                    xs, ys = curves.setdefault(key[5:], ([], []))
                elif key.startswith("knn/") and knn_curves is not None:
                    xs, ys = knn_curves.setdefault(key[4:], ([], []))
                else:
                    continue
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
    info = _pretrain_info(_run_dir_of(checkpoint))
    if info is not None and info.config_file:
        return _stem(info.config_file)
    return str(checkpoint)


def _pretrain_info(d):
    """The PretrainRunInfo in folder `d`, None where it has none or it cannot be read."""
    path = os.path.join(d, PretrainRunInfo.FILE)
    if not os.path.isfile(path):
        return None
    try:
        return PretrainRunInfo.read(path)
    except RecordError:
        return None


def _checkpoint_run(checkpoint):
    """(run_info or None, config or {}) of the pretraining run that wrote `checkpoint`."""
    if not checkpoint:
        return None, {}
    d = _run_dir_of(checkpoint)
    return _pretrain_info(d), _read_yaml(os.path.join(d, "config.yaml"))


def _read_readout(d):
    r = ReadoutRecord.read(os.path.join(d, ReadoutRecord.FILE))
    p = r.protocol or {}
    method = r.method or "?"
    random_init = method == RANDOM_METHOD
    info, pre_cfg = _checkpoint_run(r.checkpoint)
    pre_fp, pre_identity = _pretrain_identity(info, pre_cfg)
    ckpt_fp = r.checkpoint_fingerprint or pre_fp or (
        fp.random_init_fingerprint(r.arch) if random_init and not r.checkpoint
        else "path:" + str(r.checkpoint))
    protocol = {"dataset": dataset_of_folder(p.get("data_dir")),
                "pretraining": "random init" if random_init else _pretraining_of(r.checkpoint),
                "decoder": "-" if random_init else _decoder(pre_cfg),
                "arch": _default(r.arch, "?"), "readout": p.get("name", "?"),
                "readout_epochs": p.get("epochs", "?"),
                "lr": p.get("lr", "?"), "batch_size": p.get("batch_size", "?"),
                "image_size": p.get("image_size", "?"), "train_images": p.get("train_images", "?")}
    run = Run("readout", d, "finished", method, protocol)
    top1 = r.top1 or {}
    for stage in STAGES:
        if isinstance(top1.get(stage), (int, float)):
            run.metrics[f"top1/{stage}"] = float(top1[stage])
    _read_knn(d, run)
    seed = r.checkpoint_seed
    if seed is None:
        seed = _get(pre_cfg, "SEED")
    # n counts pretrainings: the seed of a readout is its checkpoint's; two readouts of one
    # checkpoint are repeats. The random-init encoder's seed is the readout's own.
    run.seed = seed if seed is not None else p.get("seed", "-")
    run.seed_parts = {"seed": run.seed}
    run.method = method
    run.fingerprint = r.fingerprint or fp.readout_fingerprint(p, ckpt_fp)
    run.identity = dict(pre_identity, **{f"readout.{k}": v for k, v in
                                         fp.readout_identity(p, ckpt_fp).items()
                                         if k != "checkpoint"})
    return run


def _read_knn(d, run):
    """knn.json beside readout.json (tools/knn_readout.py): top-1 per k and stage as metrics
    "knn/k20/res5", ..., and its protocol as run.protocol["knn"] (kNN rows group by it)."""
    path = os.path.join(d, KnnRecord.FILE)
    if not os.path.isfile(path):
        return
    r = KnnRecord.read(path)
    p = r.protocol or {}
    run.protocol["knn"] = (f"T {p.get('temperature', '?')}, {p.get('image_size', '?')} px, "
                           f"{p.get('train_images', '?')} train / {p.get('val_images', '?')} val")
    for kk, per in (r.top1 or {}).items():
        for stage in STAGES:
            value = (per or {}).get(stage)
            if isinstance(value, (int, float)):
                run.metrics[f"knn/{kk}/{stage}"] = float(value)


# The data a row was measured on, in words: the generator recorded in meta.json (docs/formats.md)
# and, for the embedded data, which of its views; rows on different data are never compared.
_GENERATED = {"loco_det.digits": "digits", "loco_det.synthetic": "embedded"}
_EMBEDDED_VIEWS = {"objects": "embedded objects", "imagefolder": "embedded scenes"}
# Detectron2 training sets by name prefix (the embedded views first: they contain the others)
_TRAIN_SETS = (("loco_synth_coco", "embedded, COCO view"),
               ("loco_synth_cityscapes", "embedded, Cityscapes view"),
               ("loco_synth_voc", "embedded, VOC view"), ("coco_", "COCO"),
               ("cityscapes_", "Cityscapes"), ("voc_", "VOC"))


def dataset_of_folder(path):
    """Name of the data under `path` (a readout's data folder or a pretraining DATA.ROOT): from
    the meta.json its generator wrote in it or up to two folders above, else the folder's own
    name (e.g. imagenet for /data/imagenet/train); "?" when no folder is recorded."""
    if not path:
        return "?"
    path = os.path.normpath(str(path))
    parts = [path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
    for i, d in enumerate(parts):
        for base in ([d] if os.path.isabs(d) else [d, os.path.join(REPO, d)]):
            meta = _read_meta(os.path.join(base, "meta.json"))
            if meta is None:
                continue
            name = _GENERATED.get(meta.get("generator"), os.path.basename(base))
            if name == "embedded" and i > 0:   # the view: the folder below meta.json
                view = os.path.basename(parts[i - 1])
                return _EMBEDDED_VIEWS.get(view, f"embedded {view}")
            return name
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base in ("train", "val") else base


@functools.lru_cache(maxsize=None)
def _read_meta(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def dataset_of_train_set(train_set):
    """Name of the data of a Detectron2 training set (as _train_set gives it)."""
    names = {next((word for prefix, word in _TRAIN_SETS if n.startswith(prefix)), n)
             for n in str(train_set).split("+")}
    return "+".join(sorted(names))


def _train_set(datasets):
    """DATASETS.TRAIN with split seeds generalised (coco_2017_train_10k_seed3 -> ..._seed*), so
    the runs on the 5 random splits form one row, as in the paper."""
    if isinstance(datasets, str):
        datasets = [datasets]
    names = [fp.generalise_split(str(n)) for n in (datasets or [])]
    return "+".join(names) or "?"


def _read_detection(d, files):
    info = RunInfo()
    if RunInfo.FILE in files:
        try:
            info = RunInfo.read_any(os.path.join(d, RunInfo.FILE))
        except RecordError:
            info = RunInfo()
    cfg = _read_yaml(os.path.join(d, "config.yaml"))
    argv = info.argv or []
    results, note = None, ""
    if DetectionResults.FILE in files:
        try:
            results = DetectionResults.read(os.path.join(d, DetectionResults.FILE))
        except RecordError as e:
            note = str(e)
    res = results or DetectionResults()
    p = res.protocol or {}
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
    from_scratch = p.get("from_scratch", _get(cfg, "LOCO_DET.FROM_SCRATCH"))
    weights_fp = (res.weights_fingerprint or _get(cfg, "LOCO_DET.WEIGHTS_FINGERPRINT")
                  or (fp.RANDOM_INIT if from_scratch else ""))
    source = res.weights_source or _get(cfg, "LOCO_DET.WEIGHTS_SOURCE") or ""
    pre_info, pre_cfg = _checkpoint_run(source)
    pre_fp, pre_identity = _pretrain_identity(pre_info, pre_cfg)
    if weights_fp == fp.RANDOM_INIT:
        weights_col, decoder = "random init", "-"
    elif pre_cfg or pre_info is not None:
        weights_col = _stem(pre_info.config_file if pre_info else None) or "pretrained here"
        decoder = _decoder(pre_cfg)
    elif weights_fp.startswith("sha256:"):
        weights_col, decoder = "published", "-"
    else:
        weights_col, decoder = "?", "?"
    train_set = _train_set(_get(cfg, "DATASETS.TRAIN"))
    protocol = {"dataset": dataset_of_train_set(train_set), "benchmark": benchmark,
                "config": config, "train_set": train_set,
                "schedule": f"{max_iter} it" if max_iter is not None else "?",
                "weights": weights_col, "decoder": decoder,
                "backbone": backbone,
                "world_size": p.get("world_size", _default(info.world_size, "?")),
                "global_batch": p.get("global_batch", _get(cfg, "SOLVER.IMS_PER_BATCH", "?"))}
    label = (res.method or _get(cfg, "LOCO_DET.LABEL")
             or _get(cfg, "LOCO_DET.RESOLVED_METHOD") or _argv_value(argv, "LOCO_DET.LABEL")
             or "?")
    split = fp.split_seed(str(_get(cfg, "DATASETS.TRAIN", "")))
    det_seed = p.get("seed", _get(cfg, "SEED"))
    pre_seed = res.weights_seed
    if pre_seed is None and _get(cfg, "LOCO_DET.WEIGHTS_SEED", -1) not in (None, -1):
        pre_seed = _get(cfg, "LOCO_DET.WEIGHTS_SEED")
    seed = det_seed
    if split is not None and str(split) != str(det_seed):
        seed = f"split{split}/seed{det_seed}"
    if pre_seed is not None and str(pre_seed) != str(det_seed):
        seed = f"pre{pre_seed}/{seed}"
    run = Run("detection", d, "unfinished", label, protocol, seed=seed, note=note)
    run.seed_parts = {"pretrain": pre_seed, "split": split,
                      "seed": det_seed}
    if not weights_fp:   # weights of unknown identity: never pooled with other labels' runs
        weights_fp = f"unidentified:{label}:{p.get('weights', _get(cfg, 'MODEL.WEIGHTS'))}"
    run.fingerprint = res.fingerprint or (
        fp.detection_fingerprint(cfg, weights_fp) if cfg else fp.digest(
            [{k: v for k, v in p.items() if k not in ("seed", "weights")}, weights_fp]))
    run.identity = dict(pre_identity, **(fp.detection_identity(cfg, weights_fp) if cfg else {}))
    run.method = str(_get(pre_cfg, "MODEL.METHOD") or (pre_info.method if pre_info else None)
                     or (RANDOM_METHOD if weights_fp == fp.RANDOM_INIT else label))
    if results is None:
        run.note = note or "no results.json"
        return run
    if results.finished is not True:
        run.note = "results.json without finished=true"
        return run
    run.status = "finished"
    for name, task, key in DET_METRICS:
        value = (getattr(results, task) or {}).get(key)
        if isinstance(value, (int, float)) and value == value:  # NaN: not a measurement
            run.metrics[name] = float(value)
    return run


def _read_dir(d, files):
    """The run in directory `d`, or None when `d` holds no run."""
    if ReadoutRecord.FILE in files:
        return _read_readout(d)
    info_kind = None
    if RunInfo.FILE in files:
        try:
            info_kind = RunInfo.read_any(os.path.join(d, RunInfo.FILE)).KIND
        except RecordError:
            info_kind = None
    if info_kind == "pretrain" or (info_kind is None
                                   and ({PretrainSummary.FILE, "metrics.jsonl"} & files)):
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
                    manifests.append((d, read_json(os.path.join(d, MANIFEST))))
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


