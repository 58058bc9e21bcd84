"""Grid preflight (tools/run_benchmark.py --dry-run / --check, and every launch): a grid with
typos or missing inputs is refused before anything runs, with every problem on one line, exit 1,
and nothing written; a SLURM submission that fails writes nothing either.

Each grid below differs from a grid that passes by the typos it names; the dry run must name
each of them (and nothing else: the problem count is exact) and leave the output folder as it
was. The checks use the real recipes and Detectron2 configs of this repository, loaded with
loco_det's and Detectron2's own config loaders.
"""
import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "run_benchmark.py")


def cli(*args):
    """The tool's main() in this process (as tests/test_run_benchmark.py does): (rc, out, err)."""
    spec = importlib.util.spec_from_file_location("run_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = module.main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    return rc, out.getvalue(), err.getvalue()


GOOD = {
    "name": "good",
    "vars": {"datasets": "{out}/datasets", "data": "{datasets}/loco_synth"},
    "env": {"DETECTRON2_DATASETS": "{datasets}"},
    "slurm": {"partition": None, "additional_parameters": {}},
    "data": [{"name": "loco_synth", "command": ["python", "tools/make_synthetic_data.py",
                                                "--out", "{data}"],
              "creates": "{data}/meta.json"}],
    "pretrain": [{"methods": ["e2e", "loco"], "recipe": "cpu_{method}.yaml", "label": "{method}",
                  "seeds": [0], "overrides": ["DATA.ROOT={data}/imagefolder/train",
                                              "OPTIM.EPOCHS=1"]}],
    "readout": {"args": ["--data", "{data}/imagefolder", "--seed", "{seed}"],
                "random_init": {"arch": "resnet18"}},
    "knn": {"args": ["--data", "{data}/imagefolder"]},
    "detection": {"supervised_weights": None, "overrides": {"SOLVER.MAX_ITER": 2},
                  "configs": [{"config": "cpu_synth_coco_R18_FPN_frozen.yaml", "seeds": [0]}]},
    "profiles": {"reduced": {"readout.args": ["--data", "{data}/imagefolder", "--epochs", "3"]}},
}


def snapshot(folder):
    """{relative path: sha256 or 'dir'} of everything below `folder` (None: absent)."""
    if not os.path.exists(folder):
        return None
    found = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(d, name), folder)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                found[os.path.relpath(os.path.join(d, name), folder)] = \
                    hashlib.sha256(f.read()).hexdigest()
    return found


def write_grid(tmp_path, grid, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid))
    return path


def problems(err):
    """The problem lines of a refused grid, and the count its last line states."""
    lines = [l[len("error: "):] for l in err.splitlines() if l.startswith("error: ")]
    last = re.search(r": (\d+) problem\(s\); nothing was run$", lines[-1]) if lines else None
    assert last, err
    return lines[:-1], int(last.group(1))


def test_the_good_grid_passes(tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = cli(write_grid(tmp_path, GOOD), "--check", "--out", out)
    assert rc == 0, err
    assert stdout.strip() == f"check: {tmp_path / 'grid.yaml'}: 15 jobs, no problems found"
    rc, stdout, err = cli(write_grid(tmp_path, GOOD), "--dry-run", "--profile", "reduced",
                          "--out", out)
    assert rc == 0 and err == "" and "# 15 jobs:" in stdout
    assert not out.exists()


def _edit(**changes):
    """A function making GOOD's copy with `changes` (dotted path -> value) applied."""
    def apply(grid, tmp_path):
        for dotted, value in changes.items():
            node = grid
            *parents, last = dotted.split("/")
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if callable(value):
                value = value(tmp_path)
            node[int(last) if isinstance(node, list) else last] = value
        return grid
    return apply


RULES_PREFIX = "pretrain[0] e2e: MODEL.METHOD 'lcoo' is not a registered rule (rules: "
CASES = {
    "method-typo": (_edit(**{"pretrain/0/methods": ["lcoo", "e2e"]}), [], [
        "pretrain[0] lcoo: no recipe pretrain/cpu_lcoo.yaml (method 'lcoo': did you mean "
        "loco?)"]),
    "detectron2-key-typo": (_edit(**{"detection/overrides": {"SOLVER.MAX_ITERS": 2}}), [], [
        "detection.overrides: SOLVER.MAX_ITERS is not a key of Detectron2's config; did you "
        "mean SOLVER.MAX_ITER?"]),
    "pretraining-key-typo": (_edit(**{"pretrain/0/overrides": [
        "DATA.ROOT={data}/imagefolder/train", "OPTIM.EPOCH=1"]}), [], [
        "pretrain[0] e2e: override OPTIM.EPOCH: not a pretraining config key (after "
        "pretrain/cpu_e2e.yaml's _BASE_ chain); did you mean OPTIM.EPOCHS?",
        "pretrain[0] loco: override OPTIM.EPOCH: not a pretraining config key (after "
        "pretrain/cpu_loco.yaml's _BASE_ chain); did you mean OPTIM.EPOCHS?"]),
    "vars-typo": (_edit(), ["--set", "vars.dat=/x"], [
        "--set vars.dat: the grid defines no vars entry 'dat' (vars: data, datasets); did you "
        "mean vars.data?"]),
    "slurm-set-typo": (_edit(), ["--set", "slurm.partiton=gpu"], [
        "--set slurm.partiton: slurm has no key 'partiton'; did you mean slurm.partition?"]),
    "slurm-grid-typo": (_edit(**{"slurm": {"partiton": "gpu"}}), [], [
        "slurm: partiton is not a parameter of submitit's SlurmExecutor; did you mean "
        "slurm.partition?"]),
    "missing-data-root": (_edit(**{"pretrain/0/overrides": lambda t: [
        f"DATA.ROOT={t}/nowhere/train"]}), [], [
        "input {tmp}/nowhere/train does not exist and no earlier job makes it (needed by "
        "pretrain/e2e/seed0 and 1 more job(s))"]),
    "missing-readout-data": (_edit(**{"knn/args": ["--data", "/nonexistent/imagefolder"]}),
                             [], ["input /nonexistent/imagefolder does not exist and no earlier "
                                  "job makes it (needed by knn/e2e/seed0 and 2 more job(s))"]),
    "missing-supervised-weights": (_edit(**{"detection/supervised_weights":
                                            lambda t: f"{t}/nope.pth"}), [], [
        "input {tmp}/nope.pth does not exist and no earlier job makes it (needed by "
        "weights/supervised_published.pkl)"]),
    "rule-typo": (_edit(**{"pretrain/0/methods": ["e2e"], "pretrain/0/overrides": [
        "DATA.ROOT={data}/imagefolder/train", "MODEL.METHOD=lcoo"]}), [], [RULES_PREFIX]),
    "detection-config-typo": (_edit(**{"detection/configs/0/config":
                                       "cpu_synth_coco_R18_FPN_frozn.yaml"}), [], [
        "detection.configs[0]: no config det_configs/cpu_synth_coco_R18_FPN_frozn.yaml; did "
        "you mean cpu_synth_coco_R18_FPN_frozen.yaml?"]),
    "detectron2-value": (_edit(**{"detection/configs/0/overrides": {"SOLVER.BASE_LR": "abc"}}),
                         [], ["detection.configs[0].overrides: SOLVER.BASE_LR 'abc': Type "
                              "mismatch"]),
    "pretraining-value": (_edit(**{"pretrain/0/methods": ["e2e"], "pretrain/0/overrides": [
        "DATA.ROOT={data}/imagefolder/train", "OPTIM.NAME=adam"]}), [], [
        "pretrain[0] e2e: OPTIM.NAME"]),
    "profile-typo": (_edit(**{"profiles": {"reduced": {"readout.argz": []}}}),
                     ["--profile", "reduced"], [
        "profile reduced: readout.argz: readout has no key 'argz'; did you mean readout.args?"]),
    "set-into-a-value": (_edit(), ["--set", "name.x=1"], ["--set name.x: name is a value"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_typo_is_named_and_nothing_is_written(case, tmp_path):
    make, flags, expected = CASES[case]
    grid = write_grid(tmp_path, make(copy.deepcopy(GOOD), tmp_path))
    out = tmp_path / "out"
    rc, stdout, err = cli(grid, "--dry-run", "--out", out, *flags)
    lines, count = problems(err)
    assert rc == 1 and count == len(lines) == len(expected), err
    for want in expected:
        want = want.replace("{tmp}", str(tmp_path))
        assert sum(line.startswith(want) for line in lines) == 1, (want, lines)
    assert not out.exists()


def test_every_problem_at_once_and_existing_output_untouched(tmp_path):
    """One grid holding every case that can coexist: one run lists them all; an output folder
    holding a previous run stays byte-identical, for a dry run, --check and a launch."""
    grid, flags, expected = copy.deepcopy(GOOD), [], []
    for name in ("method-typo", "detectron2-key-typo", "vars-typo", "slurm-set-typo",
                 "slurm-grid-typo", "missing-readout-data", "missing-supervised-weights",
                 "detectron2-value", "detection-config-typo"):
        make, more, want = CASES[name]
        grid = make(grid, tmp_path)
        flags += more
        expected += want
    # detection-config-typo replaced configs[0]: its overrides (detectron2-value) go unchecked
    expected.remove(CASES["detectron2-value"][2][0])
    expected.remove(CASES["detectron2-key-typo"][2][0])   # likewise (no loadable config)
    path = write_grid(tmp_path, grid)
    out = tmp_path / "out"
    (out / "pretrain" / "e2e" / "seed0").mkdir(parents=True)
    (out / "benchmark.json").write_text('{"kind": "benchmark_manifest", "jobs": []}\n')
    (out / "pretrain" / "e2e" / "seed0" / "summary.json").write_text('{"finished": true}\n')
    before = snapshot(out)
    for mode in (["--dry-run"], ["--check"], []):
        rc, stdout, err = cli(path, *mode, "--out", out, *flags)
        lines, count = problems(err)
        assert rc == 1 and count == len(lines) == len(expected), err
        for want in expected:   # (which jobs need an input now includes the typo's)
            want = want.replace("{tmp}", str(tmp_path)).split(" (needed by")[0]
            assert sum(line.startswith(want) for line in lines) == 1, (want, lines)
        assert snapshot(out) == before
    assert "running" not in stdout


def test_paper_grid_without_vars_names_its_missing_inputs(tmp_path):
    out = tmp_path / "paper"
    rc, stdout, err = cli("det_configs/grids/paper.yaml", "--dry-run", "--out", out)
    lines, count = problems(err)
    assert rc == 1 and count == len(lines)
    assert any(l.startswith("input datasets/imagenet/train does not exist") for l in lines)
    assert any(l.startswith("input weights/resnet50-0676ba61.pth does not exist") for l in lines)
    (conv,) = [l for l in stdout.splitlines() if " convert weights/supervised_published" in l]
    assert "cannot run: weights/resnet50-0676ba61.pth missing" in conv
    assert not out.exists()


# ----------------------------------------------------------------------------- SLURM

FAKE_SBATCH = """#!/bin/sh
# sbatch: counts its calls in $FAKE_SLURM/calls; the call numbered $FAKE_SLURM_FAIL fails
n=$(($(cat "$FAKE_SLURM/calls" 2>/dev/null || echo 0) + 1))
echo $n > "$FAKE_SLURM/calls"
if [ "$n" = "$FAKE_SLURM_FAIL" ]; then
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
echo "Submitted batch job $((1000 + n))"
"""
FAKE_SCANCEL = """#!/bin/sh
echo "$@" >> "$FAKE_SLURM/scancel.log"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, scancel (and srun, which submitit only looks for) on PATH, run by submitit's
    own SlurmExecutor."""
    pytest.importorskip("submitit")
    folder = tmp_path / "slurm_bin"
    folder.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL),
                       ("srun", "#!/bin/sh\nexit 1\n")):   # submitit looks for srun
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return folder


def test_failed_slurm_submission_writes_nothing(tmp_path, fake_slurm, monkeypatch):
    grid = write_grid(tmp_path, GOOD)
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_SLURM_FAIL", "3")
    rc, stdout, err = cli(grid, "--launcher", "slurm", "--out", out)
    assert rc == 1
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]   # (sbatch's own above)
    assert line.startswith("error: SLURM submission failed: ")
    assert "the 2 job(s) already queued were cancelled (1001, 1002)" in line
    assert line.endswith("nothing was written")
    assert (fake_slurm / "scancel.log").read_text().split() == ["1001", "1002"]
    assert not out.exists()
    # into a folder that holds an earlier run: that run's files stay as they were
    (out / "slurm" / "900").mkdir(parents=True)
    (out / "slurm" / "900" / "900_log.out").write_text("earlier job\n")
    (out / "benchmark.json").write_text("{}\n")
    before = snapshot(out)
    (fake_slurm / "calls").unlink()
    rc, stdout, err = cli(grid, "--launcher", "slurm", "--out", out)
    assert rc == 1 and snapshot(out) == before
    # the same grid submits when sbatch succeeds, and only then writes its manifest
    monkeypatch.setenv("FAKE_SLURM_FAIL", "0")
    (fake_slurm / "calls").unlink()
    rc, stdout, err = cli(grid, "--launcher", "slurm", "--out", out)
    assert rc == 0, err
    assert json.loads((out / "benchmark.json").read_text())["kind"] == "benchmark_manifest"
    assert len(json.loads((out / "slurm_jobs.json").read_text())) == 15
