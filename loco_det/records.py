"""The JSON records runs leave in their folders, one dataclass per file format.

Why: each format is defined once. The tool that writes a file builds its record and calls
`to_json`; the report reads the file back with `from_json`. docs/formats.md describes the
files; the field lists below are the same. `to_json` gives exactly the dict the tools wrote
before these types existed (optional fields are left out when unset), and `from_json` reads
files of older runs, whose missing fields take their defaults.
"""
import dataclasses
import json
import os
from typing import Optional

from .utils import write_json

# The encoder's stages as the readouts name them (Detectron2's names: res2 = layer1 ...
# res5 = layer4), the keys of "top1" in readout.json and knn.json.
STAGES = ("res2", "res3", "res4", "res5")
# The method recorded for an encoder that was never trained (the random-init baseline).
RANDOM_METHOD = "random"
# The grid runner's manifest of the runs a grid expects (loco_det/grid/progress.py writes it,
# the report reads it to list runs that never finished).
MANIFEST = "benchmark.json"


class _Absent:
    """Default of an optional field: the key is not written (unlike None, written as null)."""
    def __bool__(self):
        return False

    def __repr__(self):
        return "ABSENT"


ABSENT = _Absent()


class RecordError(ValueError):
    """A record file that cannot be read; the message is one line naming the file."""


def read_json(path):
    """Parsed JSON of `path`; RecordError with a one-line reason when unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"unreadable {os.path.basename(path)}: {e}") from None


@dataclasses.dataclass
class _Record:
    """Shared to_json / from_json / read / write of the records below. A field whose default
    is ABSENT is written only when set."""
    FILE = None          # file name in the run folder
    KIND = None          # the record's "kind" field, where the format has one

    def to_json(self):
        out = {} if self.KIND is None else {"kind": self.KIND}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is ABSENT:
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data):
        if not isinstance(data, dict):
            raise RecordError(f"{cls.FILE}: expected a JSON object, got {type(data).__name__}")
        if cls.KIND is not None and data.get("kind", cls.KIND) != cls.KIND:
            raise RecordError(f"{cls.FILE}: kind {data['kind']!r}, expected {cls.KIND!r}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    @classmethod
    def read(cls, path):
        """The record in file `path`; RecordError with a one-line reason when unreadable."""
        return cls.from_json(read_json(path))

    def write(self, folder):
        """Write FILE into `folder` (atomically); returns its path."""
        path = os.path.join(folder, self.FILE)
        write_json(path, self.to_json())
        return path


@dataclasses.dataclass
class RunInfo(_Record):
    """run_info.json: provenance every run writes at its start (utils.run_info's fields)."""
    FILE = "run_info.json"
    git_commit: Optional[str] = None
    world_size: Optional[int] = None
    argv: Optional[list] = None
    versions: Optional[dict] = None

    @staticmethod
    def read_any(path):
        """The run_info.json at `path` as the record of its "kind" (RunInfo when unknown)."""
        data = read_json(path)
        kind = data.get("kind") if isinstance(data, dict) else None
        cls = {c.KIND: c for c in (PretrainRunInfo, DetectionRunInfo)}.get(kind, RunInfo)
        return cls.from_json(data)


@dataclasses.dataclass
class PretrainRunInfo(RunInfo):
    """run_info.json of a pretraining run: provenance and what it trains."""
    KIND = "pretrain"
    method: Optional[str] = None
    arch: Optional[str] = None
    global_batch: Optional[int] = None
    epochs: Optional[int] = None
    config_file: Optional[str] = None
    seed: Optional[int] = None
    fingerprint: Optional[str] = None
    device: Optional[str] = None
    dataset_images: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    resumes: object = ABSENT           # one entry per resumed invocation


@dataclasses.dataclass
class DetectionRunInfo(RunInfo):
    """run_info.json of a Detectron2 run (tools/train_net.py)."""
    KIND = "detection"
    config_file: Optional[str] = None
    eval_only: Optional[bool] = None
    resume: Optional[bool] = None


@dataclasses.dataclass
class PretrainSummary(_Record):
    """summary.json, written when a pretraining run finishes."""
    FILE = "summary.json"
    finished: bool = False
    epochs: Optional[int] = None
    steps: Optional[int] = None
    param_sha256: Optional[list] = None
    final_losses: Optional[dict] = None      # unit -> last logged loss
    bad_images: Optional[int] = None
    world_size: Optional[int] = None
    wall_time_s: Optional[float] = None
    comm_last_step: object = ABSENT          # several processes: rank 0's last step


@dataclasses.dataclass
class ReadoutRecord(_Record):
    """readout.json of a linear readout (top-1 % per stage)."""
    FILE, KIND = "readout.json", "readout"
    checkpoint: Optional[str] = None         # absolute path; None for the random init
    method: Optional[str] = None             # the checkpoint's method, RANDOM_METHOD without one
    arch: Optional[str] = None
    top1: Optional[dict] = None              # stage -> top-1 %
    top1_stderr: Optional[dict] = None       # stage -> binomial standard error, points
    protocol: Optional[dict] = None
    checkpoint_fingerprint: Optional[str] = None
    checkpoint_seed: Optional[int] = None
    checkpoint_source: object = ABSENT       # where the encoder came from, for outside files
    fingerprint: Optional[str] = None


@dataclasses.dataclass
class KnnRecord(_Record):
    """knn.json of a weighted kNN readout (top-1 % per k and stage)."""
    FILE, KIND = "knn.json", "knn"
    checkpoint: Optional[str] = None
    method: Optional[str] = None
    arch: Optional[str] = None
    top1: Optional[dict] = None              # "k20" -> stage -> top-1 %
    checkpoint_fingerprint: object = ABSENT  # written since readouts take outside checkpoints
    checkpoint_source: object = ABSENT       # where the encoder came from, for outside files
    top1_stderr: Optional[dict] = None
    protocol: Optional[dict] = None


@dataclasses.dataclass
class DetectionResults(_Record):
    """results.json of a Detectron2 run (headline metrics, protocol and run identity)."""
    FILE, KIND = "results.json", "detection"
    finished: bool = False
    eval_only: Optional[bool] = None
    bbox: Optional[dict] = None
    segm: Optional[dict] = None
    headline_dataset: Optional[str] = None
    evaluators: Optional[list] = None
    metrics: Optional[dict] = None
    method: Optional[str] = None
    protocol: Optional[dict] = None
    fingerprint: Optional[str] = None
    weights_fingerprint: Optional[str] = None
    weights_seed: Optional[int] = None
    weights_source: Optional[str] = None
    sem_seg: object = ABSENT                 # semantic segmentation benchmarks only
    iteration: object = ABSENT               # the iteration evaluated, when known
    notes: object = ABSENT                   # what the headline could not be read from
