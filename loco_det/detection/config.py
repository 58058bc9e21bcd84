"""Detectron2 configuration for loco_det: the `LOCO_DET` node, loading with one-line errors, and
the single-process fallback for synchronised BN.

Every loco_det detection config is a plain Detectron2 yacs config plus the `LOCO_DET` node
below, so Detectron2's own tools read our files once `add_loco_config(cfg)` has run. A config
saved by `tools/train_net.py` (OUTPUT_DIR/config.yaml) therefore has to be loaded with
`setup_cfg` (or `get_cfg()` + `add_loco_config`), not with a bare `get_cfg()`.
"""
import logging

import yaml

from . import compat  # noqa: F401  (must precede every detectron2 import)
from detectron2.config import CfgNode, get_cfg

from ..utils import ConfigError, unknown_key_hint
from ..weights.safe_load import yaml_chain

logger = logging.getLogger("loco_det.detection")

# Norm names that need one process per device to mean anything. In a single process Detectron2's
# SyncBN is PyTorch's SyncBatchNorm (CUDA-only in training); the naive variants degenerate to BN.
SYNC_NORMS = ("SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
BENCHMARKS = ("coco", "cityscapes", "voc", "cityscapes_sem_seg")


def add_loco_config(cfg):
    """Add the `LOCO_DET` node (idempotent, so a config saved by loco_det merges cleanly)."""
    if "LOCO_DET" in cfg:
        return cfg
    cfg.LOCO_DET = CfgNode()
    # Train without pretrained backbone weights: Detectron2's random initialisation, i.e. the
    # "random init" baseline. MODEL.WEIGHTS must then be empty when training starts, and a
    # backbone parameter missing from a checkpoint is not an error.
    cfg.LOCO_DET.FROM_SCRATCH = False
    # Method label written to results.json ("loco", "simclr", "supervised", ...). "" takes it
    # from the converted weights' metadata ("random" when FROM_SCRATCH).
    cfg.LOCO_DET.LABEL = ""
    # "coco", "cityscapes" (instances), "voc" (PASCAL VOC boxes) or "cityscapes_sem_seg":
    # which evaluator and which report table the run belongs to. "" infers it from
    # DATASETS.TEST[0]: a name with "voc" means voc; with "cityscapes" and "sem_seg",
    # cityscapes_sem_seg; with "cityscapes", cityscapes; anything else coco.
    cfg.LOCO_DET.BENCHMARK = ""
    # Name of the recipe for results.json; "" means the --config-file's name without ".yaml".
    # train_net writes the resolved name into OUTPUT_DIR/config.yaml, so a reloaded run keeps it.
    cfg.LOCO_DET.CONFIG_NAME = ""
    # Filled in by train_net, not by hand: the method label this run resolved. It is saved in
    # OUTPUT_DIR/config.yaml so that --eval-only on the run's model_final.pth (which carries no
    # converter metadata) reports the same method.
    cfg.LOCO_DET.RESOLVED_METHOD = ""
    # Filled in by train_net, like RESOLVED_METHOD, so a continued run keeps them: the identity
    # of the backbone weights (loco_det/fingerprint.py: the pretraining's fingerprint, a sha256
    # of published weights, or "random-init"), the pretraining's SEED (-1: none) and the
    # checkpoint the weights were converted from ("" if unknown).
    cfg.LOCO_DET.WEIGHTS_FINGERPRINT = ""
    cfg.LOCO_DET.WEIGHTS_SEED = -1
    cfg.LOCO_DET.WEIGHTS_SOURCE = ""
    return cfg


def _one_line(exc):
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split())


def setup_cfg(config_file, opts=()):
    """Detectron2 defaults + LOCO_DET + `config_file` + `opts` (KEY VALUE pairs). No YAML
    file of the chain can construct Python objects (loco_det.weights.safe_load).

    A missing file, an unknown key, a value of the wrong type or an odd-length override list is a
    ConfigError with one line naming the file or key (yacs' own messages span several lines or
    are bare KeyErrors)."""
    cfg = add_loco_config(get_cfg())
    if config_file:
        # Every file of the _BASE_ chain is read with yaml.safe_load first (a Python tag is one
        # line naming file, line and tag); Detectron2 itself is told not to fall back to
        # yaml.unsafe_load, which its merge_from_file does by default.
        yaml_chain(config_file)
        try:
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except KeyError as e:
            raise ConfigError(f"{config_file}: unknown config key: {_one_line(e)}"
                              f"{unknown_key_hint(_one_line(e), cfg)}") from None
        except (ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"{config_file}: {_one_line(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: invalid YAML: {_one_line(e)}") from None
    opts = list(opts or [])
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number: {opts}")
        try:
            cfg.merge_from_list(opts)
        except KeyError as e:
            raise ConfigError(f"unknown config key in overrides: {_one_line(e)}"
                              f"{unknown_key_hint(_one_line(e), cfg)}") from None
        except AssertionError as e:
            msg = _one_line(e)
            if msg.startswith("Non-existent key"):
                raise ConfigError(
                    f"unknown config key in overrides: {msg.split(':', 1)[-1].strip()}"
                    f"{unknown_key_hint(msg, cfg)}") from None
            raise ConfigError(f"bad override: {msg}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad override: {_one_line(e)}") from None
    bench = cfg.LOCO_DET.BENCHMARK
    if bench and bench not in BENCHMARKS:
        raise ConfigError(f"LOCO_DET.BENCHMARK must be one of {BENCHMARKS} or empty; got {bench!r}")
    return cfg


def _norm_keys(node, prefix=""):
    """(dotted key, value) of every string-valued key named NORM, anywhere in the config, so
    that heads added later (or by users) are covered without a list to keep up to date."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, CfgNode):
            yield from _norm_keys(value, name + ".")
        elif key == "NORM" and isinstance(value, str):
            yield name, value


def _set(cfg, dotted, value):
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value


def apply_single_process_norm(cfg, world_size):
    """Replace synchronised BN by plain BN when there is only one process.

    The paper's configs ask for SyncBN; with one process there is nothing to synchronise with,
    and PyTorch's SyncBatchNorm refuses CPU tensors in training. Per-process BN over the whole
    batch is what SyncBN computes with world size 1, so the numbers mean the same. Each change is
    logged with the key and the norm it became. Returns the list of (key, old, new)."""
    if world_size != 1:
        return []
    changes = []
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    for key, value in list(_norm_keys(cfg)):
        if value in SYNC_NORMS:
            _set(cfg, key, "BN")
            changes.append((key, value, "BN"))
    if was_frozen:
        cfg.freeze()
    if changes:
        logger.warning(
            "single process (world size 1): synchronised BN has nothing to synchronise with; "
            "norm became BN in: " + ", ".join(f"{k} ({old} -> {new})" for k, old, new in changes))
    return changes


def infer_benchmark(cfg):
    """One of BENCHMARKS, for results.json and the evaluator choice."""
    if cfg.LOCO_DET.BENCHMARK:
        return cfg.LOCO_DET.BENCHMARK
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    name = names[0].lower() if names else ""
    if "voc" in name.split("_"):
        return "voc"
    if "cityscapes" in name:
        return "cityscapes_sem_seg" if "sem_seg" in name else "cityscapes"
    return "coco"
