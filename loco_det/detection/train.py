"""Mask R-CNN training and evaluation for loco_det: Detectron2's DefaultTrainer with the checks
that make downstream numbers trustworthy for self-supervised backbones.

What this adds to Detectron2's `tools/train_net.py` recipe, and why:

- Every input is checked before anything is written or built (config keys, dataset files,
  weights file, converter metadata vs config, compiled-op needs), so a typo costs a second and one
  line, not a half-written output folder.
- Weights are loaded with `LocoCheckpointer`: no code runs from a `.pkl`, a missing backbone
  weight is an error (unless LOCO_DET.FROM_SCRATCH), and a table of loaded/missing keys is logged.
- Synchronised BN in a single process becomes BN with a logged notice (config.py); a CUDA device
  asked for on a machine without one becomes the CPU, also logged.
- Which parameters train is logged (names and counts): "frozen" is a claim worth checking.
- Evaluation: COCO's evaluator (fast C++ path only when compiled ops exist), or for Cityscapes the
  official `cityscapesscripts` instance evaluator for mask AP plus COCO-style box AP; for PASCAL
  VOC Detectron2's `PascalVOCDetectionEvaluator` (AP, AP50, AP75); for Cityscapes semantic
  segmentation `CityscapesSemSegEvaluator` (cityscapesscripts' pixel-level mIoU).
- OUTPUT_DIR/results.json (docs/formats.md, "Detection run") is written atomically at the end, next
  to Detectron2's metrics.json; run_info.json and config.yaml at the start.

We do not call Detectron2's `default_setup`: v0.6's `collect_env` assumes compiled ops.
"""
import contextlib
import logging
import math
import os
import shutil
import sys
import weakref
from collections import OrderedDict

import torch

from . import compat
from . import components  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluator,
    PascalVOCDetectionEvaluator,
)
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from .. import fingerprint
from ..records import DetectionResults, DetectionRunInfo
from ..utils import (LocoError, atomic_write, check_output_dir, draw_seed, get_dotted, run_info,
                     write_json)
from .checkpoint import (
    LocoCheckpointer,
    backbone_state_keys,
    check_unconverted_weights,
    check_weights_metadata,
    read_weights_metadata,
)
from .config import apply_single_process_norm, infer_benchmark, setup_cfg
from .random_init import random_init_problem

logger = logging.getLogger("loco_det.detection")

# `logger.info(..., extra=FILE_ONLY)`: the record goes to log.txt, not the console (the model
# printout: hundreds of lines that say nothing about whether the run is going well).
FILE_ONLY = {"loco_det_file_only": True}


# Loggers whose every record is detail for log.txt (Detectron2's table of matched weight names).
_FILE_ONLY_LOGGERS = ("detectron2.checkpoint.c2_model_loading",)


def _console_filter(record):
    return not (getattr(record, "loco_det_file_only", False)
                or record.name in _FILE_ONLY_LOGGERS)


def _quiet_console(*names):
    """Keep FILE_ONLY records off the console handlers Detectron2's setup_logger installed."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            console = getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
            if console and _console_filter not in handler.filters:
                handler.addFilter(_console_filter)


def _register_datasets():
    """Make loco_det's datasets known to Detectron2 for the current $DETECTRON2_DATASETS.

    `import loco_det` does this at import; calling it again here (it is idempotent) re-points
    the names when the variable changed since then, and keeps `train.py` usable on its own."""
    from . import datasets

    datasets.register_all()


# ----------------------------------------------------------------------------- checks

def _check_datasets(cfg, names):
    """One line naming the dataset or file, instead of a traceback from deep in a loader."""
    known = set(DatasetCatalog.list())
    for name in names:
        if name not in known:
            similar = sorted(k for k in known if k.split("_")[0] == name.split("_")[0])[:8]
            hint = f" (registered with that prefix: {', '.join(similar)})" if similar else ""
            raise LocoError(f"dataset {name!r} is not registered{hint}")
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root", "image_dir", "gt_dir", "dirname"):
            path = meta.get(attr, None)
            if path and "://" not in str(path) and not os.path.exists(path):
                raise LocoError(
                    f"dataset {name}: {attr} {path} does not exist (data are found under "
                    "$DETECTRON2_DATASETS; the embedded data are made by "
                    "tools/make_synthetic_data.py)")


def _has_last_checkpoint(output_dir):
    return bool(output_dir) and os.path.isfile(os.path.join(output_dir, "last_checkpoint"))


# Keys a resumed run must share with the run it continues: they name what was trained on what,
# and config.yaml / results.json would otherwise claim the new values for the old run. Others
# (SOLVER.MAX_ITER to train longer, logging periods) may change.
RESUME_FIXED_KEYS = ("MODEL.WEIGHTS", "SEED", "DATASETS.TRAIN", "DATASETS.TEST",
                     "LOCO_DET.FROM_SCRATCH", "LOCO_DET.LABEL")


def _check_resume_matches_record(cfg, output_dir):
    """--resume with a checkpoint: refuse values of RESUME_FIXED_KEYS that differ from the
    run's own config.yaml (SEED -1 means "the run's seed")."""
    recorded_path = os.path.join(output_dir, "config.yaml")
    if not (_has_last_checkpoint(output_dir) and os.path.isfile(recorded_path)):
        return
    import yaml

    try:
        with open(recorded_path) as f:
            recorded = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LocoError(f"--resume: cannot read the run's {recorded_path}: {e}") from None
    for key in RESUME_FIXED_KEYS:
        node, new = get_dotted(recorded, key), get_dotted(cfg, key)
        if key == "SEED" and new < 0:
            continue
        if isinstance(new, (list, tuple)):  # the dumped config holds lists, cfg tuples
            new = list(new)
            node = list(node) if isinstance(node, (list, tuple)) else node
        if node is not None and node != new:
            raise LocoError(f"--resume: {key} is {new!r} here but {node!r} in the run's "
                            f"{recorded_path}; resume with the run's own config "
                            f"(--config-file {recorded_path}) or choose another OUTPUT_DIR")


def check_output_dir_use(cfg, output_dir, *, eval_only, resume):
    """Refuse to train into an OUTPUT_DIR that holds another run's records: a finished run
    (results.json or model_final.pth) or an unfinished one (last_checkpoint), unless --resume
    (continue it) or --eval-only (evaluate; writes *_eval files beside the run's own) says so."""
    if not output_dir:
        return
    check_output_dir(output_dir, what="OUTPUT_DIR")
    if resume and not eval_only:
        _check_resume_matches_record(cfg, output_dir)
    if eval_only or resume:
        return
    for name, state in (("results.json", "a finished run"), ("model_final.pth", "a finished run"),
                        ("last_checkpoint", "an unfinished run")):
        if os.path.exists(os.path.join(output_dir, name)):
            what = "--resume continues it" if name == "last_checkpoint" else (
                "--eval-only evaluates it again")
            raise LocoError(f"OUTPUT_DIR {output_dir} holds {state} ({name}); refusing to write "
                            f"over its records: {what}, or choose another OUTPUT_DIR")


def preflight(cfg, *, eval_only, resume):
    """Check everything that can be checked without building the model or writing files.

    Returns the converter metadata of MODEL.WEIGHTS (or None)."""
    check_output_dir_use(cfg, cfg.OUTPUT_DIR, eval_only=eval_only, resume=resume)
    components.check_compiled_ops(cfg)
    if cfg.TEST.AUG.ENABLED:
        raise LocoError("TEST.AUG (test-time augmentation) is not supported by loco_det's trainer")
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise LocoError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} (the total over all "
                        f"processes) is not divisible by the world size {world}")
    resuming = resume and _has_last_checkpoint(cfg.OUTPUT_DIR)
    weights = cfg.MODEL.WEIGHTS
    if eval_only:
        if not weights and not resuming:
            raise LocoError("--eval-only needs weights: set MODEL.WEIGHTS (e.g. a run's "
                            "model_final.pth), or --resume with a checkpoint in OUTPUT_DIR")
    elif not resuming:
        if cfg.LOCO_DET.FROM_SCRATCH and weights:
            raise LocoError(f"LOCO_DET.FROM_SCRATCH is True but MODEL.WEIGHTS is {weights}: "
                            "clear one of them")
        check_random_init_protocol(cfg)
        if not cfg.LOCO_DET.FROM_SCRATCH and not weights:
            raise LocoError("no backbone weights: set MODEL.WEIGHTS to converted weights "
                            "(tools/convert_to_detectron2.py), or LOCO_DET.FROM_SCRATCH True for "
                            "the random-initialisation baseline")
    meta = None
    if weights and not resuming:
        if "://" not in weights and not os.path.isfile(weights):
            raise LocoError(f"MODEL.WEIGHTS not found: {weights}")
        meta = read_weights_metadata(weights)  # safe unpickler: refuses code before it runs
        check_unconverted_weights(weights)
        check_weights_metadata(cfg, meta, weights)
    names = list(cfg.DATASETS.TEST) + ([] if eval_only else list(cfg.DATASETS.TRAIN))
    _check_datasets(cfg, names)
    return meta


def check_random_init_protocol(cfg):
    """A random-init run must be a baseline (loco_det.detection.random_init): refuse one that
    keeps random stages frozen or cannot train its norm."""
    if not cfg.LOCO_DET.FROM_SCRATCH:
        return
    problem = random_init_problem(cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.RESNETS.NORM)
    if problem:
        raise LocoError(problem)


def resolve_method(cfg, meta, *, reuse_recorded):
    """Method label for results.json, in this order: LOCO_DET.LABEL; the metadata of the weights
    being loaded; the label the run recorded in its config.yaml (LOCO_DET.RESOLVED_METHOD) when
    this process continues that run (`reuse_recorded`: --eval-only of its model_final.pth, or
    --resume, neither of which carries converter metadata); "random" when training from scratch."""
    if cfg.LOCO_DET.LABEL:
        return cfg.LOCO_DET.LABEL
    if meta is not None and meta.get("method"):
        return str(meta["method"])
    if meta is None and reuse_recorded and cfg.LOCO_DET.RESOLVED_METHOD:
        return cfg.LOCO_DET.RESOLVED_METHOD
    if meta is None and cfg.LOCO_DET.FROM_SCRATCH:
        return "random"
    logger.warning("the weights carry no pretraining method (not a loco_det checkpoint); "
                   "results.json says 'unknown': set LOCO_DET.LABEL to name it")
    return "unknown"


def record_weights_identity(cfg, meta, *, reuse_recorded):
    """Fill LOCO_DET.WEIGHTS_FINGERPRINT / _SEED / _SOURCE (results.json's run identity), unless
    this process continues a run that recorded them (`reuse_recorded`, as in resolve_method)."""
    if reuse_recorded and cfg.LOCO_DET.WEIGHTS_FINGERPRINT:
        return
    sha = None
    weights = cfg.MODEL.WEIGHTS
    if meta is None and weights.endswith(".pkl") and os.path.isfile(weights):
        meta = read_weights_metadata(weights)   # --resume skips preflight's reading
    if meta is None and not cfg.LOCO_DET.FROM_SCRATCH and weights and os.path.isfile(weights):
        sha = fingerprint.file_sha256(weights)
    cfg.LOCO_DET.WEIGHTS_FINGERPRINT = fingerprint.weights_fingerprint(
        meta, from_scratch=cfg.LOCO_DET.FROM_SCRATCH and not weights, sha256=sha)
    seed = (meta or {}).get("seed")
    cfg.LOCO_DET.WEIGHTS_SEED = -1 if seed is None else int(seed)
    cfg.LOCO_DET.WEIGHTS_SOURCE = str((meta or {}).get("source") or "")


# ----------------------------------------------------------------------------- setup

def _output_name(output_dir, name, eval_only):
    """An --eval-only run in a training run's folder keeps that run's records: it writes
    `<name>_eval.<ext>` instead of overwriting config.yaml / run_info.json / results.json."""
    path = os.path.join(output_dir, name)
    if eval_only and os.path.exists(path):
        stem, ext = os.path.splitext(name)
        path = os.path.join(output_dir, f"{stem}_eval{ext}")
    return path


def setup(args):
    """Config + checks + logging + seed + run records; returns (cfg, weights metadata)."""
    cfg = setup_cfg(args.config_file, args.opts)
    eval_only = bool(getattr(args, "eval_only", False))
    resume = bool(getattr(args, "resume", False))
    meta = preflight(cfg, eval_only=eval_only, resume=resume)

    rank, world = comm.get_rank(), comm.get_world_size()
    output_dir = cfg.OUTPUT_DIR
    args.loco_det_created_output_dir = bool(output_dir) and not os.path.exists(output_dir)
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="loco_det", abbrev_name="loco")
    setup_logger(output_dir, distributed_rank=rank)
    _quiet_console("fvcore", "loco_det", "detectron2")
    logger.info(f"Rank {rank} of world size {world}; arguments: {args}")

    cfg.defrost()
    apply_single_process_norm(cfg, world)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE {cfg.MODEL.DEVICE} asked for, but no CUDA device is "
                       "available: running on the CPU (MODEL.DEVICE became cpu)")
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SEED < 0:
        # Same seed on every rank; recorded in config.yaml so the run can be repeated.
        cfg.SEED = int(comm.shared_random_seed()) if world > 1 else draw_seed()
    if not cfg.LOCO_DET.CONFIG_NAME and args.config_file:
        cfg.LOCO_DET.CONFIG_NAME = os.path.splitext(os.path.basename(args.config_file))[0]
    cfg.LOCO_DET.RESOLVED_METHOD = resolve_method(
        cfg, meta, reuse_recorded=eval_only or (resume and _has_last_checkpoint(output_dir)))
    record_weights_identity(cfg, meta, reuse_recorded=eval_only or (
        resume and _has_last_checkpoint(output_dir)))
    cfg.freeze()

    if comm.is_main_process() and output_dir:
        cfg_path = _output_name(output_dir, "config.yaml", eval_only)
        with atomic_write(cfg_path, "w") as f:
            f.write(cfg.dump())
        logger.info(f"Full config saved to {cfg_path}")
        write_json(_output_name(output_dir, "run_info.json", eval_only),
                   DetectionRunInfo(**run_info(world), config_file=args.config_file,
                                    eval_only=eval_only, resume=resume).to_json())
    seed_all_rng(cfg.SEED + rank)
    return cfg, meta


# ----------------------------------------------------------------------------- evaluation

class _CityscapesEvaluatorInDir(CityscapesInstanceEvaluator):
    """cityscapesscripts writes `matches.json` into the current directory; run its evaluation
    inside this run's inference folder instead of wherever the user started the job."""

    def __init__(self, dataset_name, work_dir):
        super().__init__(dataset_name)
        self._work_dir = work_dir

    def evaluate(self):
        if comm.is_main_process():
            os.makedirs(self._work_dir, exist_ok=True)
        with _chdir(self._work_dir if comm.is_main_process() else None):
            return super().evaluate()


@contextlib.contextmanager
def _chdir(path):
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class CityscapesBoxAndMaskEvaluator(DatasetEvaluator):
    """Mask AP by the official Cityscapes evaluator, box AP COCO-style on the same predictions.

    The official evaluator scores masks only; the paper's Cityscapes table also has box AP, which
    is computed here with COCO's evaluator on the same dataset (converted to COCO format by
    Detectron2). Result keys: "bbox" (COCO-style), "segm" (official: AP, AP50), "segm_coco"
    (COCO-style mask AP, for reference)."""

    def __init__(self, dataset_name, output_dir):
        self._coco = COCOEvaluator(dataset_name, output_dir=output_dir,
                                   use_fast_impl=compat.has_compiled_ops())
        self._cityscapes = _CityscapesEvaluatorInDir(dataset_name, output_dir)

    def reset(self):
        self._coco.reset()
        self._cityscapes.reset()

    def process(self, inputs, outputs):
        self._coco.process(inputs, outputs)
        self._cityscapes.process(inputs, outputs)

    def evaluate(self):
        coco = self._coco.evaluate() or {}
        official = self._cityscapes.evaluate()
        if not comm.is_main_process():
            return {}
        out = OrderedDict()
        if "bbox" in coco:
            out["bbox"] = coco["bbox"]
        out["segm"] = dict(official["segm"]) if official else {}
        if "segm" in coco:
            out["segm_coco"] = coco["segm"]
        return out


# ----------------------------------------------------------------------------- model

def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def backbone_is_frozen(model):
    """True when no parameter of the pretrained ResNet trains (in C4 models that includes the
    res5 stage inside the ROI head, which FREEZE_AT does not reach)."""
    keys = backbone_state_keys(_unwrap(model))
    params = [p for n, p in _unwrap(model).named_parameters() if n in keys]
    return bool(params) and not any(p.requires_grad for p in params)


def log_trainable(model):
    """Log which parameters train, grouped by module, then every trainable name.

    Why: FREEZE_AT silently means different things in FPN and C4 models, and a frozen readout
    that secretly fine-tunes (or a fine-tune that trains nothing) is only caught by looking."""
    model = _unwrap(model)
    groups = OrderedDict()
    trainable = []
    for name, p in model.named_parameters():
        group = ".".join(name.split(".")[:2])
        g = groups.setdefault(group, [0, 0])
        if p.requires_grad:
            g[0] += p.numel()
            trainable.append(f"{name} {tuple(p.shape)}")
        else:
            g[1] += p.numel()
    n_train = sum(g[0] for g in groups.values())
    n_frozen = sum(g[1] for g in groups.values())
    rows = "\n".join(f"  {k:<32} trainable {a:>10,}  frozen {b:>10,}" for k, (a, b) in groups.items())
    logger.info(f"Trainable parameters: {len(trainable)} tensors, {n_train:,} values; frozen: "
                f"{n_frozen:,} values; backbone frozen: {backbone_is_frozen(model)} (per module "
                "and by name in log.txt)")
    logger.info(f"Trainable / frozen values per module:\n{rows}", extra=FILE_ONLY)
    logger.info("Trainable parameter list:\n  " + "\n  ".join(trainable), extra=FILE_ONLY)
    return trainable


class Trainer(DefaultTrainer):
    """DefaultTrainer with loco_det's checkpointer, evaluators and parameter report.

    `__init__` repeats DefaultTrainer's (Detectron2 v0.6 hard-codes its DetectionCheckpointer
    there, and the hooks capture it), with LocoCheckpointer in its place."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = LocoCheckpointer(
            model, cfg.OUTPUT_DIR, allow_missing_backbone=cfg.LOCO_DET.FROM_SCRATCH, cfg=cfg,
            trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # Detectron2 v0.6's DefaultTrainer checkpoints only the iteration and its hooks' state (the
    # LR scheduler), not the optimizer: --resume would restart SGD momentum from zero. Keep the
    # inner trainer's state (the optimizer) as later Detectron2 versions do.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimizer state (written before loco_det kept "
                           "it): training continues with fresh SGD momentum")

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info(f"Model:\n{model}", extra=FILE_ONLY)
        log_trainable(model)
        if cfg.MODEL.BACKBONE.FREEZE_AT >= 5 and not backbone_is_frozen(model):
            logger.warning("FREEZE_AT >= 5 but part of the ResNet trains: in C4 models res5 lives "
                           "in the ROI head (roi_heads.res5) and FREEZE_AT does not reach it")
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        benchmark = infer_benchmark(cfg)
        if benchmark == "cityscapes":
            evaluator = CityscapesBoxAndMaskEvaluator(dataset_name, output_folder)
        elif benchmark == "voc":
            evaluator = PascalVOCDetectionEvaluator(dataset_name)
        elif benchmark == "cityscapes_sem_seg":
            evaluator = CityscapesSemSegEvaluator(dataset_name)
        else:
            evaluator = COCOEvaluator(dataset_name, output_dir=output_folder,
                                      use_fast_impl=compat.has_compiled_ops())
        return evaluator

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        for name in cfg.DATASETS.TEST:
            logger.info(f"Evaluating {name} ({infer_benchmark(cfg)} evaluation; progress is "
                        "logged as 'Inference done i/N')")
        return super().test(cfg, model, evaluators)


# ----------------------------------------------------------------------------- results

def _clean(value):
    """JSON-safe copy: NaN/inf (pycocotools' -1 for categories without ground truth) -> None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def _headline(metrics, task, notes, dataset):
    """AP/AP50/AP75 of one task. An evaluator that received no detections reports nothing (COCO)
    or NaN; that is AP 0 (nothing found), recorded as such with a note."""
    res = metrics.get(task) or {}
    out = {}
    for key in ("AP", "AP50", "AP75"):
        v = res.get(key)
        if v is not None and isinstance(v, float) and math.isnan(v):
            v = None
        out[key] = None if v is None else float(v)
    if out["AP"] is None and not res:
        notes.append(f"{dataset}: no {task} predictions; AP set to 0")
        out = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    return out


# What each benchmark's headline reports: box/mask AP for instance tasks, mIoU for semantic
# segmentation (CityscapesSemSegEvaluator's "IoU" is the class-averaged IoU, i.e. mIoU).
HEADLINE_TASKS = {"coco": ("bbox", "segm"), "cityscapes": ("bbox", "segm"), "voc": ("bbox",),
                  "cityscapes_sem_seg": ()}
EVALUATORS = {"coco": {"bbox": "coco", "segm": "coco"},
              "cityscapes": {"bbox": "coco", "segm": "cityscapes"},
              "voc": {"bbox": "pascal_voc"},
              "cityscapes_sem_seg": {"sem_seg": "cityscapes"}}


def _sem_seg_headline(metrics, notes, dataset):
    res = metrics.get("sem_seg") or {}
    out = {"mIoU": res.get("IoU"), "iIoU": res.get("iIoU"), "mIoU_categories": res.get("IoU_sup")}
    out = {k: None if v is None or not math.isfinite(float(v)) else float(v)
           for k, v in out.items()}
    if out["mIoU"] is None:
        notes.append(f"{dataset}: no sem_seg result")
    return out


def build_results(cfg, eval_results, *, model, method, eval_only, iteration=None):
    """The results.json record (docs/formats.md, "Detection run")."""
    names = list(cfg.DATASETS.TEST)
    if eval_results and len(names) == 1 and names[0] not in eval_results:
        eval_results = {names[0]: eval_results}  # DefaultTrainer.test collapses a single dataset
    eval_results = eval_results or {}
    benchmark = infer_benchmark(cfg)
    notes = []
    bbox = segm = sem_seg = None
    if names and names[0] in eval_results:
        first = eval_results[names[0]]
        tasks = HEADLINE_TASKS[benchmark]
        bbox = _headline(first, "bbox", notes, names[0]) if "bbox" in tasks else None
        segm = _headline(first, "segm", notes, names[0]) if "segm" in tasks else None
        if benchmark == "cityscapes_sem_seg":
            sem_seg = _sem_seg_headline(first, notes, names[0])
    record = DetectionResults(
        finished=True,
        eval_only=eval_only,
        bbox=bbox,
        segm=segm,
        headline_dataset=names[0] if names else None,
        evaluators=EVALUATORS[benchmark],
        metrics=_clean({k: v for k, v in eval_results.items()}),
        method=method,
        protocol={
            "config_name": cfg.LOCO_DET.CONFIG_NAME,
            "benchmark": benchmark,
            "max_iter": int(cfg.SOLVER.MAX_ITER),
            "frozen": backbone_is_frozen(model),
            "freeze_at": int(cfg.MODEL.BACKBONE.FREEZE_AT),
            "world_size": comm.get_world_size(),
            "global_batch": int(cfg.SOLVER.IMS_PER_BATCH),
            "weights": cfg.MODEL.WEIGHTS,
            "seed": int(cfg.SEED),
            "from_scratch": bool(cfg.LOCO_DET.FROM_SCRATCH),
            "depth": int(cfg.MODEL.RESNETS.DEPTH),
            "train_datasets": list(cfg.DATASETS.TRAIN),
            "test_datasets": names,
        },
        # run identity (loco_det/fingerprint.py): config minus run-only keys, plus the weights
        fingerprint=fingerprint.detection_fingerprint(cfg, cfg.LOCO_DET.WEIGHTS_FINGERPRINT),
        weights_fingerprint=cfg.LOCO_DET.WEIGHTS_FINGERPRINT,
        weights_seed=None if cfg.LOCO_DET.WEIGHTS_SEED < 0 else int(cfg.LOCO_DET.WEIGHTS_SEED),
        weights_source=cfg.LOCO_DET.WEIGHTS_SOURCE or None)
    if benchmark == "cityscapes_sem_seg":
        record.sem_seg = sem_seg
    if iteration is not None:
        record.iteration = int(iteration)
    if notes:
        record.notes = notes
    return record.to_json()


def _write_results(cfg, results, *, model, eval_only, iteration=None):
    if not comm.is_main_process():
        return None
    record = build_results(cfg, results, model=model, method=cfg.LOCO_DET.RESOLVED_METHOD,
                           eval_only=eval_only, iteration=iteration)
    # --eval-only inside a finished run's folder keeps that run's results.json
    path = _output_name(cfg.OUTPUT_DIR, "results.json", eval_only)
    write_json(path, record)
    bb, sg = record["bbox"] or {}, record["segm"] or {}
    ss = record.get("sem_seg") or {}
    miou = f", mIoU {ss.get('mIoU')}" if "sem_seg" in record else ""
    logger.info(f"results.json written to {path}: box AP {bb.get('AP')}, mask AP {sg.get('AP')}"
                f"{miou} (method {record['method']}, frozen {record['protocol']['frozen']})")
    return record


# ----------------------------------------------------------------------------- entry point

def _remove_unstarted_run(output_dir, created):
    """A run that failed before its first iteration (weights that do not fit, ...) leaves no
    half-made run folder: an OUTPUT_DIR this process created holds only what it wrote (start
    records, an empty metrics.json and event file), so it is removed. Folders that existed
    before are left alone."""
    if created and comm.is_main_process() and output_dir and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)

def main(args):
    """One process' work (Detectron2's launcher calls it once per GPU). Returns the eval results."""
    _register_datasets()
    cfg, _ = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = LocoCheckpointer(model, cfg.OUTPUT_DIR,
                                        allow_missing_backbone=cfg.LOCO_DET.FROM_SCRATCH, cfg=cfg)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        _write_results(cfg, results, model=model, eval_only=True)
        return results

    try:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
    except LocoError:
        _remove_unstarted_run(cfg.OUTPUT_DIR, getattr(args, "loco_det_created_output_dir", False))
        raise
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    _write_results(cfg, results, model=trainer.model, eval_only=False,
                   iteration=trainer.iter)
    return results
