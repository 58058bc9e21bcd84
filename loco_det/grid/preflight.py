"""What a grid's jobs would fail on, found before any of them runs: a dry run (or --check)
lists every such problem, one line each, and a launch refuses to start with any."""
import os
import re

import yaml

from ..utils import LocoError, did_you_mean, flatten
from ..weights.safe_load import yaml_chain
from . import jobs as _jobs
from .jobs import det_config_path, one_line, recipe_path, rel, repo_path, stem
from .schema import Templates

def preflight(grid, jobs, out):
    """(problems, blocked): every problem the grid's jobs would meet that can be found without
    running them, one line each, in grid order, without repeats: recipes and learning rules,
    override keys (after _BASE_) and values of the pretraining and Detectron2 configs, external
    checkpoints, and input paths that neither exist nor are made by an earlier job; `blocked`
    maps the ids of jobs lacking an input to that input."""
    tpl = Templates(dict(grid.get("vars") or {}, out=rel(out)))
    problems, inputs = _check_pretraining(grid, tpl)
    problems += _check_detection(grid, tpl)
    problems += _check_external(grid, tpl)
    absent = missing_inputs(jobs, inputs)
    problems += [f"input {p} does not exist and no earlier job makes it (needed by {ids[0]}"
                 + (f" and {len(ids) - 1} more job(s)" if len(ids) > 1 else "") + ")"
                 for p, ids in absent.items()]
    blocked = {job_id: p for p, ids in absent.items() for job_id in ids}
    return list(dict.fromkeys(problems)), blocked


def _first(values, default=0):
    return (values or [default])[0]


def _pretrain_methods():
    """Learning rules a recipe may name without an import path: registered, or installed as a
    `loco_det.rules` entry point (listed, not imported)."""
    import importlib.metadata

    from ..pretrain.rules import ENTRY_POINT_GROUP, RULES

    return list(RULES) + sorted(ep.name for ep in importlib.metadata.entry_points(
        group=ENTRY_POINT_GROUP) if ep.name not in RULES)


def _recipe_hint(template, method, recipe):
    """' (did you mean ...)' among the recipes the block's template can name."""
    folder = os.path.join(_jobs.REPO, os.path.dirname(recipe_path(recipe)))
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) \
        if os.path.isdir(folder) else []
    base = os.path.basename(template)
    if base.count("{") == 1 and "{method}" in base:
        pattern = re.compile(re.escape(base).replace(re.escape("{method}"), "(.+)") + "$")
        methods = [m.group(1) for m in map(pattern.match, names) if m]
        hint = did_you_mean(method, methods)
        if hint:
            return f" (method {method!r}:{hint[1:]})"
    return did_you_mean(os.path.basename(recipe), names)


def _check_pretraining(grid, tpl):
    """(problems, inputs): each block's recipes exist and load, its overrides name keys of the
    recipe (after _BASE_) and have valid values, the resolved MODEL.METHOD is a rule; inputs are
    (job id prefix, DATA.ROOT) for the input check."""
    from ..pretrain import config as pcfg

    problems, inputs = [], []
    methods = None
    for i, block in enumerate(grid.get("pretrain") or []):
        for method in block.get("methods") or []:
            recipe = tpl(block["recipe"], method=method)
            recipe_file = recipe_path(recipe)
            where = f"pretrain[{i}] {method}"
            if not os.path.isfile(repo_path(recipe_file)):
                problems.append(f"{where}: no recipe {recipe_file}"
                                + _recipe_hint(block["recipe"], method, recipe))
                continue
            label = tpl(block.get("label", "{recipe}"), method=method, recipe=stem(recipe))
            local = dict(method=method, recipe=stem(recipe), label=label,
                         seed=_first(block.get("seeds")))
            overrides = [tpl(o, **local) for o in block.get("overrides") or []]
            cfg = pcfg.get_cfg()
            try:
                yaml_chain(repo_path(recipe_file))
                cfg.merge_from_file(repo_path(recipe_file), allow_unsafe=False)
            except (LocoError, KeyError, ValueError, AssertionError, TypeError,
                    yaml.YAMLError) as e:
                problems.append(f"{where}: {recipe_file}: {one_line(e)}")
                continue
            keys = flatten(cfg)
            bad = []
            for item in overrides:
                key = str(item).split("=", 1)[0]
                if "=" not in str(item):
                    bad.append(f"{where}: override {item!r} is not KEY=VALUE")
                elif key not in keys:
                    bad.append(f"{where}: override {key}: not a pretraining config key (after "
                               f"{recipe_file}'s _BASE_ chain){did_you_mean(key, keys)}")
            problems += bad
            given = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
            inputs.append((f"pretrain/{label}/", given.get("DATA.ROOT", cfg.DATA.ROOT)))
            if bad:
                continue
            rule = given.get("MODEL.METHOD", cfg.MODEL.METHOD)
            if ":" in rule:
                continue   # a plug-in rule: imported only when pretraining starts
            methods = methods if methods is not None else _pretrain_methods()
            if rule not in methods:
                problems.append(f"{where}: MODEL.METHOD {rule!r} is not a registered rule (rules: "
                                f"{', '.join(methods)}){did_you_mean(rule, methods)}")
                continue
            from ..pretrain.rules import RULES

            if rule in RULES:   # an entry point's code is not run by a preflight
                try:
                    pcfg.load_config(repo_path(recipe_file), overrides)
                except LocoError as e:
                    problems.append(f"{where}: {e}")
    return problems, inputs


def _check_detection(grid, tpl):
    """Each detection config loads with Detectron2's own loader (after _BASE_), and every override
    key of the grid is one of its keys, with a value Detectron2 accepts."""
    det = grid.get("detection") or {}
    configs = det.get("configs") or []
    if not configs:
        return []
    from ..detection.config import setup_cfg

    problems = []
    folder = os.path.join(_jobs.REPO, "det_configs")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) \
        if os.path.isdir(folder) else []
    for i, spec in enumerate(configs):
        config = det_config_path(spec["config"])
        if not os.path.isfile(repo_path(config)):
            problems.append(f"detection.configs[{i}]: no config {config}"
                            + did_you_mean(os.path.basename(config), names))
            continue
        try:
            cfg = setup_cfg(repo_path(config))
        except LocoError as e:
            problems.append(f"detection.configs[{i}]: {e}")
            continue
        keys = flatten(cfg)
        seed = _first(spec.get("seeds"))
        for where, overrides in (("detection.overrides", det.get("overrides")),
                                 (f"detection.configs[{i}].overrides", spec.get("overrides"))):
            chain = "" if where == "detection.overrides" else f" (after {config}'s _BASE_ chain)"
            for key, value in (overrides or {}).items():
                if key not in keys:
                    problems.append(f"{where}: {key} is not a key of Detectron2's config"
                                    f"{chain}{did_you_mean(key, keys)}")
                    continue
                trial = cfg.clone()
                try:
                    trial.merge_from_list([key, str(tpl(str(value), label="x", seed=seed))])
                except (KeyError, ValueError, AssertionError, TypeError) as e:
                    problems.append(f"{where}: {key} {value!r}: {one_line(e)} ({config})")
    return problems


def _check_external(grid, tpl):
    """Each external checkpoint exists, holds one ResNet the converter finds (with the entry's
    take / prefix) and is of the layout the entry names, if it names one."""
    problems = []
    for i, spec in enumerate(grid.get("external") or []):
        if not isinstance(spec, dict) or not spec.get("path"):
            continue   # expand() names the missing key
        where = f"external[{i}] {spec.get('label')}"
        ckpt = tpl(str(spec["path"]))
        if not os.path.isfile(repo_path(ckpt)):
            continue   # the input check names it
        from ..weights import layouts, resnet

        try:
            obj, _ = layouts.load_checkpoint(repo_path(ckpt))
            state, _, info = layouts.extract_encoder(obj, ckpt, spec.get("prefix"),
                                                     spec.get("take"))
            resnet.infer_resnet(state, ckpt, info["arch_hint"])
        except LocoError as e:
            problems.append(f"{where}: {e}")
            continue
        want = spec.get("layout")
        if want and str(want).lower() not in info["layout"].lower():
            problems.append(f"{where}: {ckpt} is a {info['layout']!r} checkpoint; the grid says "
                            f"layout {want!r}")
    return problems


def _made_by(path, made):
    """Whether `path` is made by one of `made` (outputs of earlier jobs): the same path, a path
    inside one (a data job's folder, a pretraining run), or a folder holding one."""
    path = os.path.normpath(path)
    return any(path == m or path.startswith(m + os.sep) or m.startswith(path + os.sep)
               for m in made)


def missing_inputs(jobs, pretrain_inputs):
    """{path: [job ids]}: input paths (pretraining DATA.ROOT, readout and kNN --data and
    --checkpoint, conversion inputs, Detectron2's dataset root) that neither exist nor are made
    by an earlier job."""
    made, missing = [], {}
    for job in jobs:
        need = list(job.requires)
        if job.stage == "pretrain":
            need += [p for prefix, p in pretrain_inputs if job.id.startswith(prefix)][:1]
        elif job.stage in ("readout", "knn"):
            need += [job.argv[i + 1] for i, a in enumerate(job.argv[:-1])
                     if a in ("--data", "--checkpoint")]
        elif job.stage == "detection":
            need.append(job.env.get("DETECTRON2_DATASETS")
                        or os.environ.get("DETECTRON2_DATASETS", "datasets"))
        for p in need:
            if p and not os.path.exists(repo_path(p)) and not _made_by(p, made):
                missing.setdefault(p, []).append(job.id)
        if job.stage == "data" and job.output:
            made.append(os.path.normpath(os.path.dirname(job.output) or job.output))
        elif job.output:
            made.append(os.path.normpath(job.output))
    return missing
