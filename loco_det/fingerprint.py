"""Run identity: a fingerprint of everything that defines what a run computed, except the seed.

Why: the report must never pool two different computations into one mean (two pretrainings of one
method with different decoders, readouts with different optimisers), and must recognise the same
computation repeated with the same seed. Labels cannot do that; a hash of the resolved settings
can. Every pretraining checkpoint (and its run_info.json), readout.json, converted .pkl and
detection results.json records one (docs/formats.md).

This is the one place that lists the run-only keys: settings that change where outputs go, how
often things are logged or saved, or how fast the same numbers are computed, but not the numbers.
A resumed pretraining may change only these (loco_det/pretrain/engine.py).

- pretraining: the resolved recipe (config.yaml) minus PRETRAIN_RUN_ONLY;
- readout: the readout protocol minus READOUT_RUN_ONLY, plus the checkpoint's fingerprint
  ("random-init" + arch for the random-init encoder);
- detection: the resolved Detectron2 config minus DETECTION_RUN_ONLY, with the split seed of a
  random training split generalised (coco_2017_train_10k_seed3 -> ..._seed*: the split is a
  repetition, like the seed), plus the fingerprint of the weights.
"""
import hashlib
import json
import re

import yaml

from .utils import flatten

# Keys added after runs were recorded, at the value that computes what runs without the key did:
# left out of the identity at that value, so those runs keep their fingerprint (and resume).
# OPTIM.ACCUM_STEPS is not run-only: BatchNorm statistics are per micro-batch.
# DATA.AUGMENT_DEVICE is not run-only: the GPU computes the same augmentation in float, so the
# views differ from the CPU's uint8 ones by rounding.
PRETRAIN_ADDED_DEFAULTS = {"OPTIM.ACCUM_STEPS": 1, "DATA.AUGMENT_DEVICE": "cpu"}
# Values that were spelled differently when runs were recorded: the identity keeps the old
# spelling, so those runs keep their fingerprint and a new run of the same computation shares it.
# RUN.AMP was a boolean before it took "bf16" | "fp16" | "off" ("fp16" has no old spelling).
PRETRAIN_RENAMED_VALUES = {"RUN.AMP": {"bf16": True, "off": False}}
PRETRAIN_RUN_ONLY = {
    "SEED": "the repetition, recorded separately",
    "DATA.NUM_WORKERS": "loader processes: speed only",
    "DATA.PREFETCH_FACTOR": "batches prepared ahead: speed and shared memory only",
    "DATA.MAX_BAD_FRACTION": "a failure threshold for unreadable images, not a setting of what "
                             "is computed on readable ones",
    "RUN.LOG_PERIOD": "logging",
    "RUN.CHECKPOINT_PERIOD": "checkpointing",
    "RUN.CHANNELS_LAST": "memory layout: speed only",
    "MODEL.LOCO_SCHEDULE": "LoCo's backward schedule: same gradients, other time/memory",
    "RUN.KNN_PERIOD": "monitoring (kNN readout during training), not what is trained",
    "RUN.KNN_DATA": "monitoring (kNN readout during training), not what is trained",
    "RUN.KNN_MAX_TRAIN_IMAGES": "monitoring (kNN readout during training), not what is trained",
    "RUN.DIST_BACKEND": "communication backend: the same averages, other transport",
    "RUN.DIST_TIMEOUT_MIN": "how long a collective may wait before the job fails",
}
READOUT_RUN_ONLY = {
    "seed": "the repetition, recorded separately",
    "workers": "loader processes: speed only",
}
DETECTION_RUN_ONLY = {
    "OUTPUT_DIR": "where outputs go",
    "SEED": "the repetition, recorded separately",
    "MODEL.WEIGHTS": "a path: replaced by the weights' fingerprint",
    "MODEL.DEVICE": "where it runs",
    "DATALOADER.NUM_WORKERS": "loader processes: speed only",
    "SOLVER.CHECKPOINT_PERIOD": "checkpointing",
    "LOCO_DET.LABEL": "a name for the report",
    "LOCO_DET.RESOLVED_METHOD": "a name for the report",
    "LOCO_DET.CONFIG_NAME": "a name for the report",
    "LOCO_DET.WEIGHTS_FINGERPRINT": "recorded separately (part of the fingerprint)",
    "LOCO_DET.WEIGHTS_SEED": "the pretraining's repetition, recorded separately",
    "LOCO_DET.WEIGHTS_SOURCE": "a path",
    "VERSION": "config format version",
}
RANDOM_INIT = "random-init"


def plain(cfg):
    """A config as nested plain dicts/lists, exactly as its dumped config.yaml reads back."""
    if hasattr(cfg, "dump"):
        return yaml.safe_load(cfg.dump())
    if isinstance(cfg, str):
        return yaml.safe_load(cfg)
    return cfg


def digest(obj):
    """16 hex digits of sha256 over canonical JSON (sorted keys, tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain_identity(cfg):
    """Flat {key: value} of a pretraining config (dict, YAML text or CfgNode) minus run-only
    keys."""
    ident = {k: v for k, v in flatten(plain(cfg)).items() if k not in PRETRAIN_RUN_ONLY
             and not (k in PRETRAIN_ADDED_DEFAULTS and PRETRAIN_ADDED_DEFAULTS[k] == v)}
    for key, old in PRETRAIN_RENAMED_VALUES.items():
        if isinstance(ident.get(key), str) and ident[key] in old:
            ident[key] = old[ident[key]]
    return ident


def pretrain_fingerprint(cfg):
    return digest(pretrain_identity(cfg))


def readout_identity(protocol, checkpoint_fingerprint):
    ident = {k: v for k, v in protocol.items() if k not in READOUT_RUN_ONLY}
    ident["checkpoint"] = checkpoint_fingerprint
    return ident


def readout_fingerprint(protocol, checkpoint_fingerprint):
    return digest(readout_identity(protocol, checkpoint_fingerprint))


def random_init_fingerprint(arch):
    return f"{RANDOM_INIT}:{arch}"


# The split seed in a random training split's dataset name (coco_2017_train_10k_seed3).
SPLIT_SEED = re.compile(r"seed(\d+)")


def generalise_split(value):
    """Dataset name(s) with the split seed generalised: ..._seed3 -> ..._seed*."""
    if isinstance(value, list):
        return [generalise_split(v) for v in value]
    return SPLIT_SEED.sub("seed*", value) if isinstance(value, str) else value


def split_seed(name):
    """The split seed (a string of digits) named in a dataset name, else None."""
    found = SPLIT_SEED.search(str(name))
    return found.group(1) if found else None


def detection_identity(cfg, weights_fingerprint):
    """Flat identity of a Detectron2 config (dict, YAML text or CfgNode) and its weights."""
    ident = {k: v for k, v in flatten(plain(cfg)).items() if k not in DETECTION_RUN_ONLY}
    if "DATASETS.TRAIN" in ident:
        ident["DATASETS.TRAIN"] = generalise_split(ident["DATASETS.TRAIN"])
    ident["weights"] = weights_fingerprint
    return ident


def detection_fingerprint(cfg, weights_fingerprint):
    return digest(detection_identity(cfg, weights_fingerprint))


def weights_fingerprint(metadata, from_scratch=False, sha256=None):
    """Fingerprint of detection weights: random init, the pretraining fingerprint recorded by the
    converter, else the converter's sha256 of its source file (published weights), else the
    sha256 of the weights file itself."""
    if from_scratch:
        return RANDOM_INIT
    metadata = metadata or {}
    if metadata.get("fingerprint"):
        return str(metadata["fingerprint"])
    if metadata.get("source_sha256"):
        return file_fingerprint(metadata["source_sha256"], metadata.get("prefix") or "")
    return "sha256:" + str(sha256 or "unknown")[:16]


def file_sha256(path):
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(sha256, prefix=""):
    """Identity of weights from a file loco_det did not write: its content hash, and where in
    it the encoder sits unless that is the top level (a DINO file holds a teacher and a student,
    different weights under one hash)."""
    return f"sha256:{str(sha256)[:16]}" + (f"@{prefix.rstrip('.')}" if prefix else "")


def changed_keys(old, new, run_only):
    """[(key, old value, new value)] of flat mappings `old`, `new`, ignoring `run_only` keys."""
    keys = sorted((set(old) | set(new)) - set(run_only))
    missing = "<absent>"
    return [(k, old.get(k, missing), new.get(k, missing)) for k in keys
            if old.get(k, missing) != new.get(k, missing)]


def _is_loco_checkpoint(obj):
    return isinstance(obj, dict) and "method" in obj and isinstance(obj.get("config"), str)


def checkpoint_fingerprint(obj):
    """Fingerprint of a loaded loco_det pretraining checkpoint (recorded, else computed from its
    config); None for anything else (torchvision or published weights)."""
    if not _is_loco_checkpoint(obj):
        return None
    return obj.get("fingerprint") or pretrain_fingerprint(obj["config"])


def checkpoint_seed(obj):
    """SEED of a loaded loco_det pretraining checkpoint, else None."""
    if not _is_loco_checkpoint(obj):
        return None
    seed = (yaml.safe_load(obj["config"]) or {}).get("SEED")
    return None if seed is None else int(seed)
