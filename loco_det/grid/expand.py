"""Expansion: a grid becomes its jobs in dependency order, one function per stage (data,
pretraining with its readout, kNN and conversion, external checkpoints, the random-init readout,
the detection baselines, detection, the report), each adding to one `Expansion`.

Every detection grid runs the random-initialisation baseline (`random_init_opts`, with the policy
of loco_det.detection.random_init); published supervised weights join when the grid names them
(detection.supervised_weights), labelled "supervised (published weights)", apart from a
`supervised` pretraining run by loco_det. A grid without them gets a note, and the manifest
records those runs without a job id, which the report does not list.
"""
import functools
import os
import sys
from dataclasses import dataclass, field

import yaml

from ..utils import LocoError, get_dotted
from . import jobs as _jobs
from .jobs import (CLI, DETECTION_PORT, EXTERNAL_SUFFIX, PRETRAIN_PORT, PUBLISHED_LABEL,
                   PUBLISHED_NAME, Job, det_config_path, python, recipe_path, rel, repo_path,
                   resources, stem, torchrun)
from .schema import SCHEMA, Templates, check_keys


@dataclass
class Source:
    """A backbone the detection jobs start from."""
    name: str                 # its folder name below det/CONFIG/
    label: str                # the method label in the report
    weights: str = None       # Detectron2 weights, None for random init
    convert_id: str = None    # the job that makes `weights`, if any
    pretrain_seed: object = None   # pair_seeds: the detection seed it runs with, if any


@dataclass
class Expansion:
    """What the stage functions share: the grid, its templates, and the jobs so far."""
    grid: dict
    out_rel: str
    tpl: Templates
    env: dict
    jobs: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    missing: list = field(default_factory=list)   # manifest entries no job produces
    data_ids: list = field(default_factory=list)
    sources: list = field(default_factory=list)   # Source per detection backbone
    supervised_missing: str = None   # why the published-weights baseline is not run

    def add(self, job):
        job.env = self.env
        if any(j.id == job.id for j in self.jobs):
            raise LocoError(f"grid: two jobs write to {job.id}; give them distinct labels")
        self.jobs.append(job)
        return job

    def path(self, *parts):
        """(job id, path): the id is the output path below the grid's out dir."""
        job_id = "/".join(str(p) for p in parts)
        return job_id, os.path.join(self.out_rel, job_id)

    @property
    def readout(self):
        return self.grid.get("readout")

    @property
    def knn(self):
        return self.grid.get("knn")

    @property
    def convert_resources(self):
        return resources((self.grid.get("convert") or {}).get("resources"))


def expand(grid, out):
    """(jobs in dependency order, notes, missing): every job of the grid, one-line notes, and
    manifest entries for expected runs that cannot be produced (no supervised weights)."""
    out_rel = rel(out)
    tpl = Templates(dict(grid.get("vars") or {}, out=out_rel))
    x = Expansion(grid, out_rel, tpl, {k: tpl(str(v)) for k, v in (grid.get("env") or {}).items()})
    data_jobs(x)
    check_sections(x)
    pretrain_jobs(x)
    external_jobs(x)
    random_readout_jobs(x)
    baseline_sources(x)
    detection_jobs(x)
    report_job(x)
    return x.jobs, x.notes, x.missing


def data_jobs(x):
    """One job per data entry and seed; every later job waits for them."""
    for i, spec in enumerate(x.grid.get("data") or []):
        check_keys(spec, SCHEMA["data"][0], f"data[{i}]")
        if "command" not in spec:
            raise LocoError(f"grid: data[{i}] needs a command")
        for seed in spec.get("seeds", [None]):
            local = {} if seed is None else {"seed": seed}
            name = x.tpl(spec.get("name", f"data{i}"), **local)
            job = x.add(Job(f"data/{name}", "data", python(x.tpl(spec["command"], **local)),
                            output=x.tpl(spec.get("creates", ""), **local),
                            done_file=x.tpl(spec.get("creates", ""), **local),
                            resources=resources(spec.get("resources")), seed=seed))
            x.data_ids.append(job.id)


def check_sections(x):
    """The readout, convert and kNN sections hold known keys; kNN needs a readout."""
    if x.readout is not None:
        check_keys(x.readout, SCHEMA["readout"], "readout")
    check_keys(x.grid.get("convert"), SCHEMA["convert"], "convert")
    check_keys(x.knn, SCHEMA["knn"], "knn")
    if x.knn is not None and x.readout is None:
        raise LocoError("grid: knn needs a readout section (knn.json goes beside readout.json)")


def readout_job(x, source, job_id, ro_dir, deps, local, *, seed, requires=()):
    """Linear readout of `source` (checkpoint options or --random-init) into `ro_dir`; `local`:
    the template variables of the grid's readout args."""
    x.add(Job(job_id, "readout", python(
        ["python", *CLI, "readout", *source, "--output-dir", ro_dir]
        + x.tpl(x.readout.get("args", []), **local)),
        ro_dir, done_file=os.path.join(ro_dir, "readout.json"), deps=deps,
        resources=resources(x.readout.get("resources")), label=local["label"], seed=seed,
        requires=list(requires)))


def knn_job(x, source, ro_id, ro_dir, deps, **local):
    """kNN readout job (id knn/...) writing knn.json into readout job `ro_id`'s folder."""
    if x.knn is None:
        return
    argv = ["python", *CLI, "knn", *source, "--output-dir", ro_dir]
    x.add(Job("knn/" + ro_id.split("/", 1)[1], "knn",
              python(argv + x.tpl(x.knn.get("args", []), **local)), ro_dir,
              done_file=os.path.join(ro_dir, "knn.json"), deps=deps,
              resources=resources(x.knn.get("resources")), label=local["label"],
              seed=local.get("seed")))


def convert_job(x, source, pkl, deps=(), *, requires=(), **fields):
    """`loco-det convert SOURCE PKL --verify` (plus the options after it)."""
    job_id = x.path("weights", os.path.basename(pkl))[0]
    return x.add(Job(job_id, "convert", python(
        ["python", *CLI, "convert", source[0], pkl, "--verify", *source[1:]]), pkl,
        done_file=pkl, deps=list(deps), resources=x.convert_resources,
        requires=list(requires), **fields))


def pretrain_jobs(x):
    """Methods x recipe x seeds per block: pretraining, its readout and kNN, its conversion."""
    for i, block in enumerate(x.grid.get("pretrain") or []):
        check_keys(block, SCHEMA["pretrain"][0], f"pretrain[{i}]")
        if "recipe" not in block or "methods" not in block:
            raise LocoError(f"grid: pretrain[{i}] needs methods and recipe")
        res = resources(block.get("resources"))
        for method in block["methods"]:
            recipe = x.tpl(block["recipe"], method=method)
            label = x.tpl(block.get("label", "{recipe}"), method=method, recipe=stem(recipe))
            for seed in block.get("seeds", [0]):
                local = dict(method=method, recipe=stem(recipe), label=label, seed=seed)
                job_id, run_dir = x.path("pretrain", label, f"seed{seed}")
                argv = pretrain_launcher(res) + [
                    *CLI, "pretrain", "--config-file", recipe_path(recipe), f"SEED={seed}"] + [
                    x.tpl(o, **local) for o in block.get("overrides", [])] + [
                    "--output-dir", run_dir]
                pre = x.add(Job(job_id, "pretrain", argv, run_dir,
                                done_file=os.path.join(run_dir, "summary.json"),
                                resume_file=os.path.join(run_dir, "checkpoint_last.pth"),
                                deps=list(x.data_ids), resources=res, label=label,
                                config=stem(recipe), seed=seed))
                ckpt = os.path.join(run_dir, "checkpoint_last.pth")
                if x.readout is not None:
                    ro_id, ro_dir = x.path("readout", label, f"seed{seed}")
                    readout_job(x, ["--checkpoint", ckpt], ro_id, ro_dir, [pre.id], local,
                                seed=seed)
                    knn_job(x, ["--checkpoint", ckpt], ro_id, ro_dir, [pre.id], **local)
                pkl = x.path("weights", f"{label.replace('/', '_')}_seed{seed}.pkl")[1]
                conv = convert_job(x, [ckpt], pkl, [pre.id], label=label, seed=seed)
                x.sources.append(Source(f"{label}_seed{seed}", label, pkl, conv.id, seed))


def external_options(spec, tpl=lambda v: v):
    """The converter's options (--take, --prefix) an `external` entry gives, for every tool."""
    opts = []
    for key in ("take", "prefix"):
        if spec.get(key) not in (None, ""):
            opts += [f"--{key}", str(tpl(str(spec[key])))]
    return opts


def external_jobs(x):
    """Checkpoints from elsewhere: the same readout, kNN, conversion and detection as a
    pretrained row, from the file as it is (no pretraining seed: every detection seed runs)."""
    for i, spec in enumerate(x.grid.get("external") or []):
        check_keys(spec, SCHEMA["external"][0], f"external[{i}]")
        if not spec.get("label") or not spec.get("path"):
            raise LocoError(f"grid: external[{i}] needs a label and a path")
        name, ckpt = str(x.tpl(str(spec["label"]))), x.tpl(str(spec["path"]))
        label = f"{name} {EXTERNAL_SUFFIX}"
        pick = external_options(spec, x.tpl)
        if x.readout is not None:
            local = dict(label=label, seed=0)
            ro_id, ro_dir = x.path("readout", "external", name)
            readout_job(x, ["--checkpoint", ckpt, *pick], ro_id, ro_dir, list(x.data_ids), local,
                        seed=None, requires=[ckpt])
            knn_job(x, ["--checkpoint", ckpt, *pick], ro_id, ro_dir, list(x.data_ids), **local)
        pkl = x.path("weights", f"external_{name.replace('/', '_')}.pkl")[1]
        conv = convert_job(x, [ckpt, *pick], pkl, label=label, requires=[ckpt])
        x.sources.append(Source(f"external_{name.replace('/', '_')}", label, pkl, conv.id))


def random_readout_jobs(x):
    """The random-init readout baseline: seed S is the initial encoder of SEED=S."""
    if x.readout is None:
        return
    random_init = x.readout.get("random_init") or {}
    check_keys(random_init, SCHEMA["readout"]["random_init"], "readout.random_init")
    arch = random_init.get("arch")
    if not arch:
        raise LocoError("grid: readout.random_init.arch is required (the random-init "
                        "readout baseline)")
    for seed in random_init.get("seeds", [0]):
        ro_id, ro_dir = x.path("readout", "random", f"seed{seed}")
        source = ["--random-init", "--arch", arch]
        readout_job(x, source, ro_id, ro_dir, list(x.data_ids), dict(label="random", seed=seed),
                    seed=seed)
        knn_job(x, source, ro_id, ro_dir, list(x.data_ids), label="random", seed=seed)


def baseline_sources(x):
    """Random init always; published supervised weights from a path (converted here unless a
    .pkl), else a note and manifest entries for the runs that cannot be made."""
    det = x.grid.get("detection") or {}
    check_keys(det, SCHEMA["detection"], "detection")
    x.sources.append(Source("random", "random"))
    supervised = det.get("supervised_weights")
    if supervised:
        weights = x.tpl(str(supervised))   # relative paths: from the repo root, like configs
        if weights.endswith(".pkl"):
            x.sources.append(Source(PUBLISHED_NAME, PUBLISHED_LABEL, weights))
        else:
            pkl = x.path("weights", PUBLISHED_NAME + ".pkl")[1]
            conv = convert_job(x, [weights], pkl, label=PUBLISHED_LABEL, requires=[weights])
            x.sources.append(Source(PUBLISHED_NAME, PUBLISHED_LABEL, pkl, conv.id))
    elif det.get("configs"):
        x.supervised_missing = ("no published supervised-ImageNet weights given in the grid "
                                "(detection.supervised_weights): that baseline is not run")
        x.notes.append(x.supervised_missing)


def detection_jobs(x):
    """Every detection config x seed x source (pair_seeds: a pretrained backbone runs only with
    its own pretraining seed, so n seeds are n runs of the whole chain; baselines run every
    seed)."""
    det = x.grid.get("detection") or {}
    for i, spec in enumerate(det.get("configs") or []):
        check_keys(spec, SCHEMA["detection"]["configs"][0], f"detection.configs[{i}]")
        if "config" not in spec:
            raise LocoError(f"grid: detection.configs[{i}] needs a config")
        config = det_config_path(spec["config"])
        res = resources(det.get("resources"), spec.get("resources"))
        seeds = spec.get("seeds", [0])
        unpaired = sorted({str(s.pretrain_seed) for s in x.sources
                           if s.pretrain_seed is not None} - {str(s) for s in seeds})
        if spec.get("pair_seeds") and unpaired:
            raise LocoError(f"grid: detection.configs[{i}] has pair_seeds but not the "
                            f"pretraining seed(s) {', '.join(unpaired)} among its seeds")
        overrides = dict(det.get("overrides") or {})
        overrides.update(spec.get("overrides") or {})
        for seed in seeds:
            for src in x.sources:
                if (spec.get("pair_seeds") and src.pretrain_seed is not None
                        and src.pretrain_seed != seed):
                    continue
                detection_job(x, config, src, seed, overrides, res)
            if x.supervised_missing:
                x.missing.append(dict(kind="detection", label=PUBLISHED_LABEL,
                                      config=stem(config), seed=seed, note=x.supervised_missing,
                                      output=x.path("det", stem(config), PUBLISHED_NAME,
                                                    f"seed{seed}")[0]))


def detection_job(x, config, src, seed, overrides, res):
    """`loco-det train` of `config` from `src`'s weights (random init: FROM_SCRATCH and the
    baseline's overrides), resumable from its last checkpoint."""
    job_id, run_dir = x.path("det", stem(config), src.name, f"seed{seed}")
    local = dict(label=src.label, seed=seed)
    opts = ["SEED", str(seed)]
    for key, value in overrides.items():
        opts += [key, str(x.tpl(str(value), **local))]
    opts += ["LOCO_DET.LABEL", src.label]
    if src.weights is None:   # (a missing config: named by the preflight)
        opts += ["LOCO_DET.FROM_SCRATCH", "True"] + (random_init_opts(
            config, overrides) if os.path.isfile(repo_path(config)) else [])
    opts += ["OUTPUT_DIR", run_dir, "MODEL.WEIGHTS", src.weights or ""]
    head = python(["python", *CLI, "train", "--config-file", config,
                   "--num-gpus", str(max(int(res["gpus_per_node"]), 1))])
    if int(res["nodes"]) > 1:
        head += ["--num-machines", str(res["nodes"]), "--machine-rank", "$NODE_RANK",
                 "--dist-url", f"tcp://$MASTER_ADDR:{DETECTION_PORT}"]
    x.add(Job(job_id, "detection", head + opts, run_dir,
              done_file=os.path.join(run_dir, "results.json"),
              resume_file=os.path.join(run_dir, "last_checkpoint"),
              resume_at=len(head),
              deps=list(x.data_ids) + ([src.convert_id] if src.convert_id else []),
              resources=res, label=src.label, config=stem(config), seed=seed))


def report_job(x):
    """The report of the output folder, after every other job."""
    x.add(Job("report", "report", python(["python", *CLI, "report", x.out_rel,
                                          "--output-dir", x.out_rel]),
              os.path.join(x.out_rel, "report.md"), deps=[j.id for j in x.jobs]))


@functools.lru_cache(maxsize=None)
def _det_cfg(path, mtime_ns):   # one load per file version: random_init_opts asks per job
    from ..detection.config import setup_cfg

    return setup_cfg(path)


def config_value(config, dotted, overrides=None):
    """`dotted` as the grid's overrides, else the Detectron2 config file `config` (loaded by
    Detectron2's own loader: its _BASE_ chain over Detectron2's defaults) resolve it."""
    if overrides and dotted in overrides:
        return yaml.safe_load(str(overrides[dotted]))
    path = config if os.path.isabs(config) else os.path.join(_jobs.REPO, config)
    try:
        node = _det_cfg(path, os.stat(path).st_mtime_ns if os.path.exists(path) else 0)
    except LocoError as e:
        raise LocoError(f"grid: detection config {config}: {e}") from None
    return get_dotted(node, dotted)


def random_init_opts(config, overrides=None):
    """The overrides the random-init detection job gets on `config` (with the grid's
    `overrides`): the policy of loco_det.detection.random_init."""
    from ..detection.random_init import random_init_overrides

    freeze_at = int(config_value(config, "MODEL.BACKBONE.FREEZE_AT", overrides))
    if freeze_at >= 5:
        return []
    return random_init_overrides(freeze_at, config_value(config, "MODEL.RESNETS.NORM", overrides))


def pretrain_launcher(res):
    """python for one process; torchrun for several (one node: --standalone; several nodes:
    c10d rendezvous on the first node, filled in on the SLURM node)."""
    nproc, nodes = max(int(res["gpus_per_node"]), 1), int(res["nodes"])
    if nproc == 1 and nodes == 1:
        return [sys.executable]
    if nodes == 1:
        return [torchrun(), "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    return [torchrun(), "--nnodes", str(nodes), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"$MASTER_ADDR:{PRETRAIN_PORT}",
            "--rdzv_id", "$JOB_ID"]
