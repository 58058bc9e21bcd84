"""A grid's jobs: the Job record, the stages, the resources a job asks for, and the small path
and command helpers every part of the runner shares.

Every job is a plain subprocess command of the installed package (`python -m loco_det.cli SUB`,
under torchrun for several processes), run in the repository root, so relative paths in a grid
are relative to it and `--dry-run` can print exactly what runs.
"""
import json
import os
import sys
from dataclasses import dataclass, field

from ..utils import LocoError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The stages of a grid's jobs, in pipeline order (not the ResNet stages: records.STAGES).
JOB_STAGES = ("data", "pretrain", "readout", "knn", "convert", "detection", "report")
DEFAULT_RESOURCES = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": None,
                     "time_min": 60}
# Published supervised weights (detection.supervised_weights) get their own label, distinct from
# a `supervised` pretraining run by loco_det (method supervised, labelled by its grid block).
PUBLISHED_NAME = "supervised_published"
PUBLISHED_LABEL = "supervised (published weights)"
EXTERNAL_SUFFIX = "(external)"   # after an external entry's label, in the report too
PRETRAIN_PORT = 29500
DETECTION_PORT = 29501
# How every job starts a loco_det command: the installed package (`python -m loco_det.cli SUB`),
# not a script path of the checkout.
CLI = ("-m", "loco_det.cli")


@dataclass
class Job:
    id: str                 # unique, also the output path relative to the grid's out dir
    stage: str
    argv: list
    output: str             # path (relative to the repo root when inside it)
    done_file: str = ""     # the job is skipped when this exists (and is finished)
    resume_file: str = ""   # "--resume" is added when this exists
    resume_at: int = -1     # where "--resume" goes in argv (-1: at the end)
    deps: list = field(default_factory=list)
    resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    label: str = ""
    config: str = ""
    seed: object = None
    requires: list = field(default_factory=list)   # input files that must exist to start
    env: dict = field(default_factory=dict)

    def is_done(self):
        """Finished results exist. JSON results must say finished (a crash can leave a file
        that was written early, never one with finished: true)."""
        if not self.done_file or not os.path.exists(repo_path(self.done_file)):
            return False
        if self.done_file.endswith(("summary.json", "results.json")):
            try:
                with open(repo_path(self.done_file)) as f:
                    return json.load(f).get("finished") is True
            except (OSError, ValueError):
                return False
        return True

    def resuming(self):
        return bool(self.resume_file) and os.path.exists(repo_path(self.resume_file))

    def command(self):
        """argv as it runs now: with --resume when an interrupted run left a checkpoint."""
        argv = list(self.argv)
        if self.resuming():
            argv.insert(len(argv) if self.resume_at < 0 else self.resume_at, "--resume")
        return argv


def repo_path(path):
    """`path` as the jobs see it: relative paths are relative to the repository root."""
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def rel(path):
    """Paths in commands are relative to the repo root (jobs run there) when inside it."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path, REPO)
    return path if relative.startswith("..") else relative


def python(argv):
    """`argv` with a leading "python" replaced by this interpreter."""
    return [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]


def torchrun():
    local = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return local if os.path.exists(local) else "torchrun"


def resources(*specs):
    """DEFAULT_RESOURCES updated by each of `specs` in turn (later ones win)."""
    res = dict(DEFAULT_RESOURCES)
    for spec in specs:
        for key, value in (spec or {}).items():
            if key not in DEFAULT_RESOURCES:
                raise LocoError(f"grid: unknown resource '{key}' (known: "
                                f"{', '.join(DEFAULT_RESOURCES)})")
            res[key] = value
    return res


def recipe_path(recipe):
    """A recipe named without a folder is one of pretrain/."""
    return recipe if os.path.dirname(recipe) else os.path.join("pretrain", recipe)


def det_config_path(config):
    """A detection config named without a folder is one of det_configs/."""
    return config if os.path.dirname(config) else os.path.join("det_configs", config)


def stem(name):
    return os.path.splitext(os.path.basename(name))[0]


def one_line(e):
    """An exception's message on one line (a KeyError's without its quotes)."""
    return " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
