"""tools/run_benchmark.py: grid expansion (the paper's grid, the demo grid and its reduced
profile), local runs with skip/resume/failure handling, and SLURM submission.

Local runs use fake tools (quick scripts that write the docs/formats.md outputs with known
numbers) in a temporary repository root, so the orchestration is tested in seconds; the real
tools are exercised by their own tests and by the reduced demo.
"""
import contextlib
import copy
import importlib.util
import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from loco_det import grid as benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "run_benchmark.py")


def _load_tool():
    spec = importlib.util.spec_from_file_location("run_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*args):
    """The tool's main() in this process (a subprocess per call costs seconds of imports);
    test_cli_in_a_subprocess checks the real process boundary once."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = _load_tool().main(list(args))
            except SystemExit as e:   # argparse --help
                rc = e.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


# ----------------------------------------------------------------------------- grid expansion

def paper_inputs(folder):
    """--set options giving the paper grid inputs that exist (its preflight refuses a grid whose
    data or weights are missing): an ImageNet folder and supervised weights."""
    (folder / "imagenet" / "train").mkdir(parents=True, exist_ok=True)
    (folder / "resnet50-0676ba61.pth").touch()
    return ["--set", f"vars.imagenet={folder / 'imagenet'}",
            "--set", f"detection.supervised_weights={folder / 'resnet50-0676ba61.pth'}"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    inputs = tmp_path_factory.mktemp("paper_inputs")
    res = cli("det_configs/grids/paper.yaml", "--dry-run", *paper_inputs(inputs))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    commands = [shlex.split(l) for l in lines if not l.startswith("#")]
    return {"out": res.stdout, "lines": lines, "commands": commands, "inputs": inputs}


def _with(commands, *tokens):
    return [c for c in commands if all(t in c for t in tokens)]


def test_paper_grid_counts(paper):
    # data: 5 COCO-10K + 5 COCO-1K splits; pretrain: 3 methods x {100, 800} ep + e2e with
    # LoCo's decoder at 100 and 800 ep; readout: 8 + random init; a kNN readout per readout;
    # convert: 8 + supervised; detection: (8 pretrainings + random + supervised) x (COCO frozen +
    # Cityscapes frozen + 5 COCO-10K splits + 5 COCO-1K splits + 2 x 5 VOC trials + 2 semantic
    # segmentation); report.
    assert paper["lines"][-1] == ("# 286 jobs: 10 data, 8 pretrain, 9 readout, 9 knn, "
                                  "9 convert, 240 detection, 1 report")
    assert len(paper["commands"]) == 286
    cmds = paper["commands"]
    assert len(_with(cmds, "train")) == 240
    assert len(_with(cmds, "LOCO_DET.FROM_SCRATCH", "True")) == 24   # random init everywhere
    assert len(_with(cmds, "LOCO_DET.LABEL", "supervised (published weights)")) == 24
    for config, n in (("coco_R50_FPN_1x_frozen", 10), ("cityscapes_R50_FPN_frozen", 10),
                      ("coco10k_R50_FPN_finetune", 50), ("coco1k_R50_FPN_finetune", 50)):
        assert len(_with(cmds, f"det_configs/{config}.yaml")) == n
    for size, name in ((10000, "10k"), (1000, "1k")):
        for seed in range(1, 6):
            assert _with(cmds, "subset", str(size), str(seed))
            det = _with(cmds, f'["coco_2017_train_{name}_seed{seed}"]')
            assert len(det) == 10 and all(c[c.index("SEED") + 1] == str(seed) for c in det)


def test_paper_grid_runs_the_fair_end_to_end_baseline(paper):
    """e2e with LoCo's decoder (one conv block) at 100 and 800 epochs, through readout and
    every detection config, like the other pretrainings."""
    from loco_det.pretrain.config import load_config

    cmds = paper["commands"]
    for ep in (100, 800):
        recipe = f"pretrain/simclr_r50_{ep}ep_deepdecoder.yaml"
        (pre,) = _with(cmds, "pretrain", recipe)
        cfg = load_config(os.path.join(ROOT, recipe))
        loco = load_config(os.path.join(ROOT, f"pretrain/loco_r50_{ep}ep.yaml"))
        assert cfg.MODEL.METHOD == "e2e" and cfg.OPTIM.EPOCHS == ep
        assert cfg.MODEL.DECODER == loco.MODEL.DECODER and cfg.MODEL.DECODER.CONV_BLOCKS == 1
        run = f"runs/paper/pretrain/simclr_r50_{ep}ep_deepdecoder/seed0"
        assert pre[-2:] == ["--output-dir", run]
        assert _with(cmds, "readout", f"{run}/checkpoint_last.pth")
        assert len(_with(cmds, "train",
                         f"runs/paper/weights/simclr_r50_{ep}ep_deepdecoder_seed0.pkl")) == 24


def _opts(cmd):
    """The KEY VALUE overrides of a train_net command (after --num-gpus N)."""
    return cmd[cmd.index("--num-gpus") + 2:]


def test_random_init_trains_from_scratch_on_fine_tuning_configs(paper):
    """Every random-init job on a fine-tuning config resolves (Detectron2's own config
    resolution) to FREEZE_AT 0 with a norm that trains in the backbone; on a frozen config it
    stays frozen (FREEZE_AT 5)."""
    from loco_det.detection.config import setup_cfg

    random_jobs = _with(paper["commands"], "LOCO_DET.FROM_SCRATCH", "True")
    seen = set()
    for cmd in random_jobs:
        config = cmd[cmd.index("--config-file") + 1]
        cfg = setup_cfg(os.path.join(ROOT, config), _opts(cmd))
        if setup_cfg(os.path.join(ROOT, config), []).MODEL.BACKBONE.FREEZE_AT < 5:  # fine-tuning
            assert cfg.MODEL.BACKBONE.FREEZE_AT == 0, config
            assert cfg.MODEL.RESNETS.NORM in ("SyncBN", "BN"), config
        else:
            assert cfg.MODEL.BACKBONE.FREEZE_AT == 5, config
            assert "MODEL.BACKBONE.FREEZE_AT" not in cmd
        seen.add(config)
    assert len(seen) == 8   # COCO x 3, Cityscapes, VOC x 2, semantic segmentation x 2
    # pretrained weights keep the protocol's own FREEZE_AT (2 on the fine-tuning configs)
    for cmd in _with(paper["commands"], "det_configs/coco10k_R50_FPN_finetune.yaml"):
        if "LOCO_DET.FROM_SCRATCH" not in cmd:
            assert "MODEL.BACKBONE.FREEZE_AT" not in cmd


def test_ablation_decoder_grid_lists_the_six_settings(tmp_path):
    from loco_det.pretrain.config import load_config

    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    res = cli("det_configs/grids/ablation_decoder.yaml", "--dry-run",
              "--set", f"vars.imagenet={tmp_path / 'imagenet'}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == ("# 20 jobs: 6 pretrain, 7 readout, 6 convert, "
                                           "1 report")
    cmds = [shlex.split(l) for l in res.stdout.splitlines() if not l.startswith("#")]
    want = {"e2e": ("e2e", 0, 2), "gim": ("gim", 0, 2), "gim_conv1": ("gim", 1, 2),
            "e2e_mlp4": ("e2e", 0, 4), "loco": ("loco", 1, 2), "loco_mlp4": ("loco", 1, 4)}
    for label, (method, conv, mlp) in want.items():
        (pre,) = _with(cmds, "pretrain",
                       f"runs/ablation_decoder/pretrain/{label}/seed0")
        recipe = pre[pre.index("--config-file") + 1]
        overrides = [a for a in pre[pre.index(recipe) + 1:pre.index("--output-dir")]
                     if "=" in a and not a.startswith(("SEED=", "DATA.ROOT="))]
        cfg = load_config(os.path.join(ROOT, recipe), overrides)
        assert (cfg.MODEL.METHOD, cfg.MODEL.DECODER.CONV_BLOCKS,
                cfg.MODEL.DECODER.MLP_LAYERS, cfg.OPTIM.EPOCHS) == (method, conv, mlp, 100)
        assert _with(cmds, "readout",
                     f"runs/ablation_decoder/pretrain/{label}/seed0/checkpoint_last.pth")
    from loco_det.report import PAPER_TABLES
    (table,) = [t for t in PAPER_TABLES if "decoder-depth" in t["title"].lower()]
    assert {row[1] for row in table["rows"]} == set(want)


def test_paper_grid_commands(paper):
    cmds = paper["commands"]
    for method in ("simclr", "gim", "loco"):
        for ep in (100, 800):
            (pre,) = _with(cmds, "pretrain", f"pretrain/{method}_r50_{ep}ep.yaml")
            assert os.path.basename(pre[0]) == "torchrun"
            assert pre[pre.index("--nnodes") + 1] == "4"
            assert pre[pre.index("--nproc_per_node") + 1] == "8"
            assert "SEED=0" in pre and f"DATA.ROOT={paper['inputs']}/imagenet/train" in pre
            run = f"runs/paper/pretrain/{method}_r50_{ep}ep/seed0"
            assert pre[-2:] == ["--output-dir", run]
            (conv,) = _with(cmds, "convert", f"{run}/checkpoint_last.pth")
            assert conv[-2:] == [f"runs/paper/weights/{method}_r50_{ep}ep_seed0.pkl", "--verify"]
            assert _with(cmds, "readout", f"{run}/checkpoint_last.pth")
            det = _with(cmds, "train",
                        f"runs/paper/weights/{method}_r50_{ep}ep_seed0.pkl")
            assert len(det) == 24
            assert all(c[c.index("LOCO_DET.LABEL") + 1] == f"{method}_r50_{ep}ep" for c in det)
            assert all(c[c.index("--num-gpus") + 1] == "8" for c in det)
    (sup,) = _with(cmds, "convert", str(paper["inputs"] / "resnet50-0676ba61.pth"))
    assert sup[-2:] == ["runs/paper/weights/supervised_published.pkl", "--verify"]
    assert _with(cmds, "readout", "--random-init", "resnet50")
    (frozen,) = _with(cmds, "det_configs/coco_R50_FPN_1x_frozen.yaml", "random")
    assert frozen[-4:] == ["OUTPUT_DIR", "runs/paper/det/coco_R50_FPN_1x_frozen/random/seed0",
                           "MODEL.WEIGHTS", ""]
    assert cmds[-1][1:] == ["-m", "loco_det.cli", "report", "runs/paper", "--output-dir",
                           "runs/paper"]


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "paper"
    res = cli("det_configs/grids/paper.yaml", "--dry-run", "--out", str(out),
              *paper_inputs(tmp_path))
    assert res.returncode == 0 and not out.exists()


def test_demo_grid_and_reduced_profile(tmp_path):
    full = cli("det_configs/grids/demo.yaml", "--dry-run", "--out", str(tmp_path / "d"))
    reduced = cli("det_configs/grids/demo.yaml", "--dry-run", "--profile", "reduced",
                  "--out", str(tmp_path / "d"))
    for res in (full, reduced):
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[-1] == ("# 30 jobs: 1 data, 4 pretrain, 5 readout, "
                                               "5 knn, 4 convert, 10 detection, 1 report")
        assert "no published supervised-ImageNet weights" in res.stdout
    ids = lambda r: [l.split()[3] for l in r.stdout.splitlines() if l.startswith("# [")]
    assert ids(full) == ids(reduced)   # the same jobs, the same code path
    cmds = [shlex.split(l) for l in reduced.stdout.splitlines() if not l.startswith("#")]
    for method in ("e2e", "gim", "loco", "supervised"):
        (pre,) = _with(cmds, "pretrain", f"pretrain/cpu_{method}.yaml")
        assert "OPTIM.EPOCHS=1" in pre
    det = _with(cmds, "train")
    assert {c[c.index("LOCO_DET.LABEL") + 1] for c in det} == {"e2e", "gim", "loco", "supervised",
                                                              "random"}
    assert all(c[c.index("SOLVER.MAX_ITER") + 1] == "2" for c in det)
    # the full demo runs the grid's own (shortened) schedule, not the reduced one
    with open(os.path.join(ROOT, "det_configs", "grids", "demo.yaml")) as f:
        demo_iters = str(yaml.safe_load(f)["detection"]["overrides"]["SOLVER.MAX_ITER"])
    full_det = _with([shlex.split(l) for l in full.stdout.splitlines() if not l.startswith("#")],
                     "train")
    assert len(full_det) == 10 and demo_iters != "2"
    assert all(c[c.index("SOLVER.MAX_ITER") + 1] == demo_iters for c in full_det)
    # --set reaches into mappings whose keys contain dots (Detectron2 keys)
    res = cli("det_configs/grids/demo.yaml", "--dry-run", "--out", str(tmp_path / "d"),
              "--set", "detection.overrides.SOLVER.MAX_ITER=7", "--set", "vars.data=/x")
    cmds = [shlex.split(l) for l in res.stdout.splitlines() if not l.startswith("#")]
    det = _with(cmds, "train")
    assert len(det) == 10 and all(c[c.index("SOLVER.MAX_ITER") + 1] == "7" for c in det)
    assert _with(cmds, "tools/make_synthetic_data.py", "/x")


# ----------------------------------------------------------------------------- local runs

FAKE_TOOL = r'''
import json, os, sys
name = os.path.basename(sys.argv[0])[:-3]
args = sys.argv[1:]
if name == "cli":   # python -m loco_det.cli SUB ...: the name of the tool SUB stands for
    name = {"pretrain": "pretrain", "readout": "linear_readout", "knn": "knn_readout",
            "convert": "convert_to_detectron2", "train": "train_net"}[args[0]]
    args = args[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([name] + args) + "\n")
if os.environ.get("FAKE_TIMES"):   # when each job ran, with how many threads, beside how many
    import time
    t0 = time.time()
    running = os.environ["FAKE_TIMES"] + ".running"   # a file per job running now
    os.makedirs(running, exist_ok=True)
    me = os.path.join(running, f"{name}.{os.getpid()}")
    open(me, "w").close()
    seen = len(os.listdir(running))
    if name == "pretrain":   # both pretrainings are ready at once: each waits for the other
        passed = running + ".passed"   # then both wait until both saw the pair (a barrier)
        os.makedirs(passed, exist_ok=True)
        deadline = time.time() + 120   # run one at a time, a lone one gives up and records 1
        while sum(n.startswith("pretrain.") for n in os.listdir(running)) < 2 \
                and time.time() < deadline:
            time.sleep(0.01)
        seen = max(seen, len(os.listdir(running)))
        open(os.path.join(passed, str(os.getpid())), "w").close()
        while len(os.listdir(passed)) < 2 and time.time() < deadline:
            time.sleep(0.01)
        # A runner that starts more than two jobs starts a third one now: give it 3 s to show
        # up (a window for seeing a fault; a correct runner never fails by it).
        window = time.time() + 3
        while len(os.listdir(running)) < 3 and time.time() < window:
            time.sleep(0.01)
    seen = max(seen, len(os.listdir(running)))
    os.remove(me)
    with open(os.environ["FAKE_TIMES"], "a") as f:
        f.write(json.dumps([name, t0, time.time(), os.environ.get("OMP_NUM_THREADS"),
                            " ".join(args), seen]) + "\n")
def arg(flag):
    return args[args.index(flag) + 1] if flag in args else None
def dump(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
fail = os.environ.get("FAKE_FAIL", "")
if fail and fail in " ".join(args):
    print("error: fake failure", file=sys.stderr)
    sys.exit(3)
if name == "make_synthetic_data":
    dump(os.path.join(arg("--out"), "meta.json"), {"seed": 0})
elif name == "pretrain":
    out = arg("--output-dir")
    method = os.path.basename(arg("--config-file"))[4:-5]
    seed = int([a for a in args if a.startswith("SEED=")][0][5:])
    dump(f"{out}/run_info.json", {"kind": "pretrain", "method": method, "arch": "resnet18",
         "world_size": 1, "global_batch": 8, "epochs": 1, "config_file": arg("--config-file")})
    with open(f"{out}/config.yaml", "w") as f:
        f.write(f"SEED: {seed}\n")
    with open(f"{out}/metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "loss/unit1": 5.0}) + "\n")
    open(f"{out}/checkpoint_last.pth", "w").close()
    if method in os.environ.get("FAKE_KILL", "").split(","):
        sys.exit(1)   # killed after a checkpoint, before summary.json
    dump(f"{out}/summary.json", {"finished": True, "final_losses": {"unit1": 4.0 + seed}})
elif name == "linear_readout":
    method = "random" if "--random-init" in args else "m"
    dump(f"{arg('--output-dir')}/readout.json", {"kind": "readout", "method": method,
         "arch": "resnet18", "checkpoint": arg("--checkpoint"),
         "top1": {"res2": 1.0, "res3": 2.0, "res4": 3.0, "res5": 4.0}, "protocol": {}})
elif name == "convert_to_detectron2":
    if not os.path.exists(args[0]):
        print(f"error: {args[0]}: not found", file=sys.stderr)
        sys.exit(1)
    open(args[1], "w").close() if os.path.isdir(os.path.dirname(args[1])) else (
        os.makedirs(os.path.dirname(args[1])), open(args[1], "w").close())
elif name == "train_net":
    opts = args[args.index("--num-gpus") + 2:]
    if opts and opts[0] == "--resume":
        opts = opts[1:]
    kv = dict(zip(opts[::2], opts[1::2]))
    out = kv["OUTPUT_DIR"]
    seed = int(kv["SEED"])
    label = kv["LOCO_DET.LABEL"]
    dump(f"{out}/run_info.json", {"kind": "detection", "world_size": 1, "argv": sys.argv})
    open(f"{out}/last_checkpoint", "w").close()
    if "det-" + label in os.environ.get("FAKE_KILL", "").split(","):
        sys.exit(1)
    ap = {"random": 1.0, "supervised (published weights)": 20.0}.get(label, 10.0) + seed
    dump(f"{out}/results.json", {"kind": "detection", "finished": True, "method": label,
         "bbox": {"AP": ap, "AP50": ap, "AP75": ap}, "segm": {"AP": ap - 1, "AP50": ap,
         "AP75": ap}, "protocol": {"config_name": os.path.basename(arg("--config-file"))[:-5],
         "benchmark": "coco", "max_iter": 2, "frozen": True, "freeze_at": 5, "world_size": 1,
         "global_batch": 2, "weights": kv["MODEL.WEIGHTS"], "seed": seed}})
'''

GRID = {
    "name": "small",
    "vars": {"data": "{out}/datasets/loco_synth"},
    "env": {"DETECTRON2_DATASETS": "{out}/datasets"},
    "data": [{"name": "synth", "command": ["python", "tools/make_synthetic_data.py", "--out",
                                           "{data}"], "creates": "{data}/meta.json"}],
    "pretrain": [{"methods": ["e2e", "loco"], "recipe": "cpu_{method}.yaml", "label": "{method}",
                  "seeds": [0], "overrides": ["DATA.ROOT={data}/imagefolder/train"]}],
    "readout": {"args": [], "random_init": {"arch": "resnet18"}},
    "detection": {"supervised_weights": "weights/sup.pkl",
                  "configs": [{"config": "cpu_synth_coco_R18_FPN_frozen.yaml", "seeds": [0, 1]}]},
}


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repository root whose tools/ and loco_det.cli are the fake tools; jobs run there."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    (repo / "loco_det").mkdir()
    (repo / "loco_det" / "__init__.py").write_text("")
    (repo / "loco_det" / "cli.py").write_text(FAKE_TOOL)
    for name in ("make_synthetic_data", "pretrain", "linear_readout", "convert_to_detectron2",
                 "train_net"):
        (repo / "tools" / f"{name}.py").write_text(FAKE_TOOL)
    shutil.copytree(os.path.join(ROOT, "pretrain"), repo / "pretrain")   # checked at launch
    (repo / "weights").mkdir()
    (repo / "weights" / "sup.pkl").write_text("")
    (repo / "det_configs").mkdir()   # the grid reads FREEZE_AT/NORM of its detection configs
    for name in ("cpu_synth_coco_R18_FPN_frozen.yaml", "Base-loco-SSL.yaml"):
        shutil.copy(os.path.join(ROOT, "det_configs", name), repo / "det_configs" / name)
    grid = repo / "small.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setattr(benchmark.jobs, "REPO", str(repo))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_KILL", raising=False)
    tool = _load_tool()

    def run(*extra):
        return tool.main([str(grid), "--out", str(repo / "runs" / "small"), "-q", *extra])

    def calls():
        if not log.exists():
            return []
        return [json.loads(l) for l in log.read_text().splitlines()]

    return {"repo": repo, "out": repo / "runs" / "small", "run": run, "calls": calls}


def test_local_run_then_rerun_skips(fake_repo, capsys):
    assert fake_repo["run"]() == 0
    first = capsys.readouterr().out
    calls = fake_repo["calls"]()
    # data 1, pretrain 2, readout 3, convert 2, detection (e2e, loco, random, sup) x 2 seeds
    assert [c[0] for c in calls].count("train_net") == 8 and len(calls) == 16
    assert "summary: 17 jobs" in first and "17 done" in first
    out = fake_repo["out"]
    md = (out / "report.md").read_text()
    det_rows = [l for l in md.split("## Detection")[1].split("## Linear")[0].splitlines()
                if l.startswith("| ") and not l.startswith("| method")]
    assert sorted(l.split(" | ")[0][2:] for l in det_rows) == [
        "e2e", "loco", "random", "supervised (published weights)"]
    assert all("| 2 | 0,1 | ok |" in l for l in det_rows)
    assert "| 10.50 ± 0.71 |" in md   # seeds 0 and 1: AP 10 and 11
    manifest = json.loads((out / "benchmark.json").read_text())
    assert len(manifest["jobs"]) == 2 + 3 + 8

    assert fake_repo["run"]() == 0
    second = capsys.readouterr().out
    assert len(fake_repo["calls"]()) == 16           # nothing ran again
    assert second.count("skipped  ") == 16
    assert "skipped  pretrain/loco/seed0  (results exist: " in second
    assert "16 skipped" in second and "1 done" in second   # the report is rewritten


def test_parallel_jobs_give_the_same_results(fake_repo, capsys, monkeypatch, tmp_path):
    times = tmp_path / "times.jsonl"
    monkeypatch.setenv("FAKE_TIMES", str(times))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fake_repo["run"]("--jobs", "2") == 0
    out = capsys.readouterr().out
    assert "summary: 17 jobs" in out and "17 done" in out
    assert "note: 2 jobs at a time, OMP_NUM_THREADS=" in out
    calls = fake_repo["calls"]()
    assert [c[0] for c in calls].count("train_net") == 8 and len(calls) == 16
    md = (fake_repo["out"] / "report.md").read_text()
    assert "| 10.50 ± 0.71 |" in md
    spans = [json.loads(l) for l in times.read_text().splitlines()]
    assert {s[3] for s in spans} == {str(max(1, (os.cpu_count() or 1) // 2))}
    # two at a time (the two pretrainings wait for each other: one at a time would fail
    # here), never more (each job counts the jobs running beside it)
    assert [s[5] for s in spans if s[0] == "pretrain"] == [2, 2], spans
    assert max(s[5] for s in spans) == 2, spans
    data_end = next(s[2] for s in spans if s[0] == "make_synthetic_data")
    assert all(s[1] >= data_end for s in spans if s[0] != "make_synthetic_data")
    # a detection run starts only after its backbone's conversion ended
    for method in ("e2e", "loco"):
        conv_end = next(s[2] for s in spans if s[0] == "convert_to_detectron2"
                        and f"{method}_seed0.pkl" in s[4])
        dets = [s for s in spans if s[0] == "train_net" and f"{method}_seed0.pkl" in s[4]]
        assert len(dets) == 2 and all(s[1] >= conv_end for s in dets)


def test_jobs_must_be_positive(fake_repo, capsys):
    with pytest.raises(SystemExit) as e:
        fake_repo["run"]("--jobs", "0")
    assert e.value.code == 2 and "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert not fake_repo["out"].exists()


def test_paired_seeds_and_random_init_seeds(fake_repo, capsys):
    grid = copy.deepcopy(GRID)
    grid["pretrain"][0]["seeds"] = [0, 1]
    grid["readout"] = {"args": ["--seed", "{seed}"], "random_init": {"arch": "resnet18",
                                                                     "seeds": [0, 1]}}
    grid["detection"]["configs"][0]["pair_seeds"] = True
    path = fake_repo["repo"] / "paired.yaml"
    path.write_text(yaml.safe_dump(grid))
    tool = _load_tool()
    assert tool.main([str(path), "--out", str(fake_repo["out"]), "--dry-run"]) == 0
    cmds = [shlex.split(l) for l in capsys.readouterr().out.splitlines()
            if not l.startswith("#")]
    det = _with(cmds, "train")
    # e2e and loco: seed s with pretraining seed s only; random and published: both seeds
    runs = sorted(c[c.index("OUTPUT_DIR") + 1].split("/det/")[1] for c in det)
    assert runs == [f"cpu_synth_coco_R18_FPN_frozen/{name}/seed{s}" for name, s in [
        ("e2e_seed0", 0), ("e2e_seed1", 1), ("loco_seed0", 0), ("loco_seed1", 1),
        ("random", 0), ("random", 1), ("supervised_published", 0),
        ("supervised_published", 1)]]
    random_ro = _with(cmds, "readout", "--random-init")
    assert [(c[c.index("--output-dir") + 1].split("/readout/")[1], c[c.index("--seed") + 1])
            for c in random_ro] == [("random/seed0", "0"), ("random/seed1", "1")]

    grid["detection"]["configs"][0]["seeds"] = [0]
    path.write_text(yaml.safe_dump(grid))
    assert tool.main([str(path), "--out", str(fake_repo["out"]), "--dry-run"]) == 1
    assert ("detection.configs[0] has pair_seeds but not the pretraining seed(s) 1 among its "
            "seeds") in capsys.readouterr().err


def test_failed_job_blocks_dependants_and_exits_nonzero(fake_repo, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "cpu_loco.yaml")
    assert fake_repo["run"]() == 1
    out = capsys.readouterr().out
    assert "failed   pretrain/loco/seed0  (exit 3" in out
    for dep in ("readout/loco/seed0", "weights/loco_seed0.pkl",
                "det/cpu_synth_coco_R18_FPN_frozen/loco_seed0/seed1"):
        assert f"blocked  {dep}  (dependency failed: " in out
    assert "done     det/cpu_synth_coco_R18_FPN_frozen/e2e_seed0/seed1" in out
    assert "1 failed, 4 blocked" in out
    log = fake_repo["out"] / "logs" / "pretrain__loco__seed0.log"
    assert "error: fake failure" in log.read_text()
    md = (fake_repo["out"] / "report.md").read_text()
    missing = md.split("## Missing or unfinished runs")[1].split("## Paper")[0]
    assert "pretrain/loco/seed0" in missing and "det/cpu_synth_coco_R18_FPN_frozen/loco_seed0" \
        in missing

    monkeypatch.delenv("FAKE_FAIL")       # fixed: the rerun does only what is left
    n_before = len(fake_repo["calls"]())
    assert fake_repo["run"]() == 0
    assert len(fake_repo["calls"]()) - n_before == 1 + 1 + 1 + 2
    capsys.readouterr()


def test_interrupted_runs_resume(fake_repo, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_KILL", "loco,det-e2e")
    assert fake_repo["run"]() == 1
    monkeypatch.delenv("FAKE_KILL")
    n_before = len(fake_repo["calls"]())
    assert fake_repo["run"]() == 0
    out = capsys.readouterr().out
    new = fake_repo["calls"]()[n_before:]
    (pre,) = [c for c in new if c[0] == "pretrain"]
    assert pre[-1] == "--resume"
    det = [c for c in new if c[0] == "train_net" and "e2e" in c]
    assert len(det) == 2 and all(c[c.index("--num-gpus") + 2] == "--resume" for c in det)
    assert "resuming pretrain/loco/seed0" in out


def test_supervised_weights_missing(fake_repo, capsys):
    grid = dict(GRID, detection=dict(GRID["detection"], supervised_weights=None))
    path = fake_repo["repo"] / "nosup.yaml"
    path.write_text(yaml.safe_dump(grid))
    tool = _load_tool()
    out = fake_repo["out"]
    assert tool.main([str(path), "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "note: no published supervised-ImageNet weights given in the grid" in text
    # the grid did not ask for that baseline: the report neither lists nor counts it
    md = (out / "report.md").read_text()
    assert "supervised (published weights)" not in md
    assert "missing or unfinished: 0." in md


def test_slurm_submission(fake_repo, capsys, monkeypatch):
    import submitit

    submitted = []

    class FakeExecutor:
        def __init__(self, folder):
            self.params = {}

        def update_parameters(self, **params):
            self.params.update(params)

        def submit(self, fn):
            pickle.loads(pickle.dumps(fn))   # submitit pickles the callable
            submitted.append((fn.job.id, self.params))
            return type("J", (), {"job_id": str(100 + len(submitted))})()

    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert fake_repo["run"]("--launcher", "slurm") == 0
    ids = {job_id: str(101 + i) for i, (job_id, _) in enumerate(submitted)}
    params = dict(submitted)
    assert len(submitted) == 17
    assert params["pretrain/loco/seed0"]["dependency"] == f"afterok:{ids['data/synth']}"
    det = params["det/cpu_synth_coco_R18_FPN_frozen/loco_seed0/seed1"]
    assert det["dependency"] == f"afterok:{ids['data/synth']}:{ids['weights/loco_seed0.pkl']}"
    assert det["additional_parameters"] == {"kill-on-invalid-dep": "yes"}
    assert params["report"]["dependency"].startswith("afterany:")
    assert "gpus_per_node" not in det and det["nodes"] == 1 and det["time"] == 60
    assert det["ntasks_per_node"] == 1 and det["cpus_per_task"] == 2
    assert json.loads((fake_repo["out"] / "slurm_jobs.json").read_text()) == ids
    capsys.readouterr()


def test_slurm_command_fills_in_node_placeholders(tmp_path, monkeypatch):
    import submitit

    env = type("E", (), {"hostnames": ["node7", "node8"], "global_rank": 1, "job_id": "55"})
    monkeypatch.setattr(submitit, "JobEnvironment", env)
    record = tmp_path / "argv.txt"
    job = benchmark.Job("x", "pretrain", [sys.executable, "-c", "import sys; open(sys.argv[1], "
                        "'w').write(' '.join(sys.argv[2:]))", str(record),
                        "$MASTER_ADDR:29500", "$NODE_RANK", "$JOB_ID"], output=str(tmp_path))
    benchmark.SlurmCommand(job)()
    assert record.read_text() == "node7:29500 1 55"


def test_slurm_without_sbatch_is_one_line_error(fake_repo, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert fake_repo["run"]("--launcher", "slurm") == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --launcher slurm needs SLURM (sbatch not found on PATH)"


@pytest.mark.parametrize("grid_text, sets, message", [
    ("name: x\npretrain: [{methods: [a], recipe: '{nope}.yaml'}]\n", [],
     "error: grid: unknown variable {nope}"),
    ("name: x\nbogus: 1\n", [], "error: {path}: unknown grid key(s): bogus"),
    ("name: x\npretrain: [{methods: [a], recipe: r.yaml, seed: [1]}]\n", [],
     "error: grid: pretrain[0]: unknown key(s) seed"),
    ("name: x\n", ["vars.a"], "error: --set vars.a: expected KEY=VALUE"),
])
def test_grid_errors_are_one_line(tmp_path, grid_text, sets, message):
    path = tmp_path / "g.yaml"
    path.write_text(grid_text)
    args = [str(path), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    res = cli(*args)
    assert res.returncode == 1
    assert res.stderr.startswith(message.replace("{path}", str(path))), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_help_and_missing_grid(tmp_path):
    res = cli("--help")
    assert res.returncode == 0 and "Examples:" in res.stdout and "--dry-run" in res.stdout
    res = cli(str(tmp_path / "nope.yaml"), "--dry-run")
    assert res.returncode == 1 and res.stderr.strip() == f"error: {tmp_path}/nope.yaml: grid " \
        "file not found"


def test_cli_in_a_subprocess(tmp_path):
    res = subprocess.run([sys.executable, TOOL, str(tmp_path / "nope.yaml")], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {tmp_path}/nope.yaml: grid file not found"


def test_slurm_srun_line_gets_the_cpus_per_task(fake_repo, capsys, monkeypatch, tmp_path):
    """The sbatch script submitit writes for each job (its real text, from the parameters the
    launcher sets) starts the task with `srun ... --cpus-per-task=N`: srun does not inherit it
    from sbatch on Slurm 22.05-23.02."""
    import submitit

    scripts = {}

    class RecordingExecutor(submitit.SlurmExecutor):
        def submit(self, fn):
            scripts[fn.job.id] = self._make_submission_file_text("python -u -m task", "uid")
            return type("J", (), {"job_id": str(100 + len(scripts))})()

    monkeypatch.setattr(submitit, "SlurmExecutor", RecordingExecutor)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert fake_repo["run"]("--launcher", "slurm") == 0
    capsys.readouterr()
    assert len(scripts) == 17
    for job_id, text in scripts.items():
        srun = [line for line in text.splitlines() if line.startswith("srun ")]
        assert len(srun) == 1, text
        assert "#SBATCH --cpus-per-task=2" in text.splitlines()
        assert "--cpus-per-task=2" in shlex.split(srun[0]), (job_id, srun[0])


def test_gpu_slices_give_concurrent_jobs_their_own_devices():
    """--jobs N on a GPU machine: each job's CUDA_VISIBLE_DEVICES holds gpus_per_node GPUs no
    running job holds; a CPU job gets none; a job waits for free GPUs, and one that asks for
    more than the machine has can never run. One job at a time: nothing is set."""
    def job(gpus):
        return benchmark.Job("j", "pretrain", ["true"], "o",
                             resources=dict(benchmark.DEFAULT_RESOURCES, gpus_per_node=gpus))

    slices = benchmark.GpuSlices.for_machine(3, {"CUDA_VISIBLE_DEVICES": "4,5,7"})
    a, _ = slices.take(job(1))
    b, _ = slices.take(job(2))
    assert a == {"CUDA_VISIBLE_DEVICES": "4"} and b == {"CUDA_VISIBLE_DEVICES": "5,7"}
    assert slices.take(job(0)) == ({"CUDA_VISIBLE_DEVICES": ""}, None)
    assert slices.take(job(1)) == (None, None)                 # waits
    assert slices.take(job(4)) == (None, "needs 4 GPUs, this machine has 3")
    slices.give(b)
    assert slices.take(job(2)) == ({"CUDA_VISIBLE_DEVICES": "5,7"}, None)
    one = benchmark.GpuSlices.for_machine(1, {"CUDA_VISIBLE_DEVICES": "4,5,7"})
    assert one.take(job(2)) == ({}, None)
    no_gpu = benchmark.GpuSlices.for_machine(3, {"CUDA_VISIBLE_DEVICES": ""})
    assert no_gpu.take(job(1)) == ({}, None)


def test_parallel_local_jobs_run_on_disjoint_gpus(tmp_path, monkeypatch, capsys):
    """run_local with 2 workers and 2 GPUs: three 1-GPU jobs, each recording its
    CUDA_VISIBLE_DEVICES and time span; jobs that overlap in time hold different GPUs. Each job
    waits until two jobs have started, so the first two surely overlap."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    started = tmp_path / "started"
    started.mkdir()
    record = ("import json, os, sys, time; t0 = time.time(); d = sys.argv[2]; "
              "open(os.path.join(d, os.path.basename(sys.argv[1])), 'w').close(); "
              "end = time.time() + 120\n"
              "while len(os.listdir(d)) < 2 and time.time() < end: time.sleep(0.01)\n"
              "open(sys.argv[1], 'w').write(json.dumps([os.environ['CUDA_VISIBLE_DEVICES'], t0, "
              "time.time()]))")
    res = dict(benchmark.DEFAULT_RESOURCES, gpus_per_node=1)
    jobs = [benchmark.Job(f"j{i}", "pretrain", [sys.executable, "-c", record,
                                                  str(tmp_path / f"j{i}.json"), str(started)],
                          str(tmp_path / f"j{i}"), resources=dict(res)) for i in range(3)]
    assert benchmark.run_local(jobs, [], str(tmp_path / "out"), workers=2) == 0
    assert "GPUs 0,1 shared out by gpus_per_node" in capsys.readouterr().out
    spans = [json.loads((tmp_path / f"j{i}.json").read_text()) for i in range(3)]
    assert all(s[0] in ("0", "1") for s in spans)
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if a[1] < b[2] and b[1] < a[2]:      # ran at the same time
                assert a[0] != b[0]
    assert spans[0][1] < spans[1][2] and spans[1][1] < spans[0][2], spans   # j0 and j1 overlap
