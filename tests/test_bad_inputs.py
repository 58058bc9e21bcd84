"""Bad or awkward input to every tool, as a new user would type it: one parametrised table of
(tool, arguments, expected exit code, regular expression of the one expected line).

Each case runs the tool's real `main()` (in this process: the tools are thin, and loading
Detectron2 once keeps the table fast) against a shared workspace of real files: a COCO
annotation file, a finished and an unfinished detection run, a pretraining run, a finished
readout, converted and unconverted weights. For every case the test checks the exit code, that
exactly one line starts with 'error:' (argparse's usage errors: 'NAME: error:') and matches the
expected pattern, which names the file or key, that no traceback escaped, and that every file
in the workspace is byte-identical afterwards, with nothing added.
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
DET = os.path.join(REPO, "det_configs")
FROZEN = os.path.join(DET, "cpu_synth_coco_R18_FPN_frozen.yaml")
_loaded = {}


def tool(name):
    if name not in _loaded:
        spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(TOOLS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, synth_root, pkl_r18):
    """The workspace every case runs in (read-only for the cases: that is what is checked)."""
    import torchvision


    w = tmp_path_factory.mktemp("bad_inputs")
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 8, "width": 8}
                       for i in range(1, 6)],
            "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (w / "instances_train2017.json").write_text(json.dumps(coco))
    (w / "truncated.json").write_text('{"images": [')
    (w / "list.json").write_text("[1, 2]")
    (w / "a_file").write_text("not a directory\n")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().state_dict()
    torch.save(tv, w / "torchvision_r18.pth")
    torch.save({"encoder": tv, "method": "loco", "arch": "resnet18"}, w / "checkpoint_last.pth")
    shutil.copyfile(pkl_r18, w / "loco_r18.pkl")   # the same weights, converted once a session
    (w / "garbage.pkl").write_bytes(b"\x80\x04garbage")
    with open(w / "loco_r18.pkl", "rb") as f:
        converted = pickle.load(f)  # our own file
    converted["model"] = {k: v for k, v in converted["model"].items() if not k.startswith("res5")}
    with open(w / "no_res5.pkl", "wb") as f:
        pickle.dump(converted, f)
    finished = w / "det_finished"
    finished.mkdir()
    (finished / "config.yaml").write_text("MODEL:\n  WEIGHTS: loco_r18.pkl\nSEED: 7\n")
    (finished / "results.json").write_text(json.dumps({"kind": "detection", "finished": True}))
    (finished / "model_final.pth").write_bytes(b"weights")
    (finished / "log.txt").write_text("a finished run\n")
    unfinished = w / "det_unfinished"
    unfinished.mkdir()
    (unfinished / "last_checkpoint").write_text("model_0000009.pth")
    (unfinished / "model_0000009.pth").write_bytes(b"weights")
    (unfinished / "config.yaml").write_text(f"MODEL:\n  WEIGHTS: {w / 'loco_r18.pkl'}\nSEED: 7\n")
    pre = w / "pretrain_run"
    pre.mkdir()
    torch.save({"encoder": {}, "method": "loco", "arch": "resnet18", "epoch": 1, "step": 2},
               pre / "checkpoint_last.pth")
    readout = w / "readout_done"
    readout.mkdir()
    (readout / "readout.json").write_text(json.dumps({"kind": "readout"}))
    (w / "grid.yaml").write_text("name: g\n")
    return w


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# (id, tool, argv ({w}: the workspace, {d}: det_configs), exit code, pattern of the one line)
CASES = [
    # --- make_coco_subset
    ("subset-src-is-out", "make_coco_subset",
     "--size 2 --seed 0 --src {w}/instances_train2017.json --out {w}/instances_train2017.json",
     1, r"--out \S*instances_train2017\.json is the input file"),
    ("subset-src-is-out-other-spelling", "make_coco_subset",
     "--size 2 --seed 0 --src {w}/instances_train2017.json --out {w}/./instances_train2017.json",
     1, r"is the input file \S*instances_train2017\.json"),
    ("subset-out-is-directory", "make_coco_subset",
     "--size 2 --seed 0 --src {w}/instances_train2017.json --out {w}", 1,
     r"--out \S+ is a directory"),
    ("subset-out-under-a-file", "make_coco_subset",
     "--size 2 --seed 0 --src {w}/instances_train2017.json --out {w}/a_file/sub.json", 1,
     r"a_file is an existing file"),
    ("subset-src-missing", "make_coco_subset", "--size 2 --seed 0 --src {w}/nope.json --out "
     "{w}/o.json", 1, r"not found: \S*nope\.json"),
    ("subset-src-truncated", "make_coco_subset", "--size 2 --seed 0 --src {w}/truncated.json "
     "--out {w}/o.json", 1, r"cannot read COCO annotation file \S*truncated\.json"),
    ("subset-src-not-coco", "make_coco_subset", "--size 2 --seed 0 --src {w}/list.json "
     "--out {w}/o.json", 1, r"not a COCO instances file"),
    ("subset-size-zero", "make_coco_subset", "--size 0 --seed 0 --src "
     "{w}/instances_train2017.json --out {w}/o.json", 1, r"--size must be positive"),
    ("subset-size-too-large", "make_coco_subset", "--size 99 --seed 0 --src "
     "{w}/instances_train2017.json --out {w}/o.json", 1, r"--size 99 is larger than the 5"),
    ("subset-size-not-int", "make_coco_subset", "--size ten --seed 0", 2,
     r"--size: invalid int value: 'ten'"),
    # --- pretrain
    ("pretrain-output-is-file", "pretrain", "--config pretrain/cpu_loco.yaml --output-dir "
     "{w}/a_file", 1, r"--output-dir \S*a_file is an existing file"),
    ("pretrain-output-under-file", "pretrain", "--config pretrain/cpu_loco.yaml --output-dir "
     "{w}/a_file/run", 1, r"a_file, which is an existing file"),
    ("pretrain-config-missing", "pretrain", "--config {w}/nope.yaml --output-dir {w}/p", 1,
     r"nope\.yaml"),
    ("pretrain-unknown-key", "pretrain", "--config pretrain/cpu_loco.yaml --output-dir {w}/p "
     "OPTIM.EPOCS=3", 1, r"OPTIM\.EPOCS"),
    ("pretrain-existing-run-without-resume", "pretrain", "--config pretrain/cpu_loco.yaml "
     "--output-dir {w}/pretrain_run", 1, r"checkpoint_last\.pth already exists .*--resume"),
    ("pretrain-missing-data", "pretrain", "--config pretrain/cpu_loco.yaml --output-dir {w}/p "
     "DATA.ROOT={w}/no_images", 1, r"no_images"),
    ("pretrain-no-output-dir", "pretrain", "--config pretrain/cpu_loco.yaml", 2,
     r"--output-dir"),
    # --- linear_readout
    ("readout-epochs-zero", "linear_readout", "--random-init --arch resnet18 --epochs 0 "
     "--output-dir {w}/r", 1, r"--epochs 0: must be at least 1"),
    ("readout-epochs-negative", "linear_readout", "--random-init --arch resnet18 --epochs -3 "
     "--output-dir {w}/r", 1, r"--epochs -3: must be at least 1"),
    ("readout-batch-negative", "linear_readout", "--random-init --arch resnet18 --batch-size -1 "
     "--output-dir {w}/r", 1, r"--batch-size -1: must be at least 1"),
    ("readout-image-size-zero", "linear_readout", "--random-init --arch resnet18 --image-size 0 "
     "--output-dir {w}/r", 1, r"--image-size 0: must be at least 32"),
    ("readout-lr-negative", "linear_readout", "--random-init --arch resnet18 --lr -1 "
     "--output-dir {w}/r", 1, r"--lr -1\.0: must be a positive number"),
    ("readout-momentum-one", "linear_readout", "--random-init --arch resnet18 --momentum 1 "
     "--output-dir {w}/r", 1, r"--momentum 1\.0: must be in \[0, 1\)"),
    ("readout-workers-negative", "linear_readout", "--random-init --arch resnet18 --workers -2 "
     "--output-dir {w}/r", 1, r"--workers -2"),
    ("readout-converted-pkl", "linear_readout", "--checkpoint {w}/loco_r18.pkl --output-dir "
     "{w}/r", 1, r"--checkpoint \S*loco_r18\.pkl is a plain pickle .*checkpoint_last\.pth"),
    ("readout-json-as-checkpoint", "linear_readout", "--checkpoint {w}/list.json --output-dir "
     "{w}/r", 1, r"list\.json: cannot read checkpoint"),
    ("readout-checkpoint-missing", "linear_readout", "--checkpoint {w}/nope.pth --output-dir "
     "{w}/r", 1, r"nope\.pth"),
    ("readout-checkpoint-is-dir", "linear_readout", "--checkpoint {w}/pretrain_run "
     "--output-dir {w}/r", 1, r"--checkpoint \S*pretrain_run is a directory"),
    ("readout-output-is-file", "linear_readout", "--random-init --arch resnet18 --output-dir "
     "{w}/a_file", 1, r"--output-dir \S*a_file is an existing file"),
    ("readout-finished-output", "linear_readout", "--random-init --arch resnet18 --output-dir "
     "{w}/readout_done", 1, r"readout_done already holds a finished readout"),
    ("readout-random-init-no-arch", "linear_readout", "--random-init --output-dir {w}/r", 2,
     r"--random-init needs --arch"),
    ("readout-bad-arch", "linear_readout", "--random-init --arch resnet7 --output-dir {w}/r", 1,
     r"--arch 'resnet7'"),
    ("readout-epochs-not-int", "linear_readout", "--random-init --arch resnet18 --epochs x "
     "--output-dir {w}/r", 2, r"--epochs: invalid int value"),
    # --- train_net
    ("det-finished-output-dir", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/loco_r18.pkl OUTPUT_DIR {w}/det_finished SEED 3", 1,
     r"OUTPUT_DIR \S*det_finished holds a finished run \(results\.json\).*--eval-only"),
    ("det-unfinished-output-dir", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/loco_r18.pkl OUTPUT_DIR {w}/det_unfinished", 1,
     r"det_unfinished holds an unfinished run \(last_checkpoint\).*--resume"),
    ("det-resume-other-seed", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "--resume MODEL.WEIGHTS {w}/loco_r18.pkl OUTPUT_DIR {w}/det_unfinished SEED 3", 1,
     r"--resume: SEED is 3 here but 7 in the run's \S*det_unfinished/config\.yaml"),
    ("det-resume-other-weights", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml --resume MODEL.WEIGHTS {w}/no_res5.pkl "
     "OUTPUT_DIR {w}/det_unfinished", 1, r"--resume: MODEL\.WEIGHTS is '\S*no_res5\.pkl' here"),
    ("det-unconverted-torchvision", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml MODEL.WEIGHTS {w}/torchvision_r18.pth OUTPUT_DIR "
     "{w}/d", 1, r"torchvision_r18\.pth is a torchvision ResNet state dict .*convert it first"),
    ("det-unconverted-pretraining", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml MODEL.WEIGHTS {w}/checkpoint_last.pth OUTPUT_DIR "
     "{w}/d", 1, r"checkpoint_last\.pth is a loco_det pretraining checkpoint .*convert_to_detectron2"),
    ("det-output-is-file", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/loco_r18.pkl OUTPUT_DIR {w}/a_file", 1,
     r"OUTPUT_DIR \S*a_file is an existing file"),
    ("det-num-gpus-after-overrides", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml MODEL.WEIGHTS {w}/loco_r18.pkl OUTPUT_DIR {w}/d "
     "--num-gpus 1", 1, r"--num-gpus comes after the KEY VALUE config overrides"),
    ("det-resume-after-overrides", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml OUTPUT_DIR {w}/d --resume", 1,
     r"--resume comes after the KEY VALUE config overrides"),
    ("det-config-missing", "train_net", "--config-file {w}/nope.yaml", 1, r"nope\.yaml"),
    ("det-unknown-key", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "SOLVER.MAX_ITERS 3 OUTPUT_DIR {w}/d", 1, r"SOLVER\.MAX_ITERS"),
    ("det-weights-missing", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/nope.pkl OUTPUT_DIR {w}/d", 1, r"MODEL\.WEIGHTS not found: \S*nope\.pkl"),
    ("det-weights-garbage", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/garbage.pkl OUTPUT_DIR {w}/d", 1, r"garbage\.pkl"),
    ("det-no-weights", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "OUTPUT_DIR {w}/d", 1, r"no backbone weights: set MODEL\.WEIGHTS"),
    ("det-scratch-and-weights", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml LOCO_DET.FROM_SCRATCH True MODEL.WEIGHTS "
     "{w}/loco_r18.pkl OUTPUT_DIR {w}/d", 1, r"LOCO_DET\.FROM_SCRATCH is True but MODEL\.WEIGHTS"),
    ("det-weights-do-not-fit", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml MODEL.WEIGHTS {w}/no_res5.pkl OUTPUT_DIR {w}/d", 1,
     r"backbone parameter backbone\.bottom_up\.res5\S* .*is missing from \S*no_res5\.pkl"),
    ("det-config-mismatch", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/loco_r18.pkl INPUT.FORMAT BGR OUTPUT_DIR {w}/d", 1,
     r"INPUT\.FORMAT is 'BGR' in the config but 'RGB'.*Base-loco-SSL\.yaml"),
    ("det-unknown-dataset", "train_net", "--config-file {d}/cpu_synth_coco_R18_FPN_frozen.yaml "
     "MODEL.WEIGHTS {w}/loco_r18.pkl DATASETS.TRAIN ('nope_train',) OUTPUT_DIR {w}/d", 1,
     r"dataset 'nope_train' is not registered"),
    ("det-zero-gpus", "train_net", "--num-gpus 0 --config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml", 1, r"--num-gpus and --num-machines must be"),
    ("det-eval-only-no-weights", "train_net", "--eval-only --config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml OUTPUT_DIR {w}/d", 1, r"--eval-only needs weights"),
    ("det-batch-not-divisible", "train_net", "--config-file "
     "{d}/cpu_synth_coco_R18_FPN_frozen.yaml MODEL.WEIGHTS {w}/loco_r18.pkl OUTPUT_DIR {w}/d "
     "TEST.AUG.ENABLED True", 1, r"TEST\.AUG"),
    # --- convert_to_detectron2 (cases that concern its input and output paths)
    ("convert-input-missing", "convert_to_detectron2", "{w}/nope.pth {w}/out.pkl", 1,
     r"nope\.pth"),
    ("convert-output-not-pkl", "convert_to_detectron2", "{w}/checkpoint_last.pth {w}/out.pth", 1,
     r"\.pkl"),
    # --- install_detectron2
    ("install-sdist-missing", "install_detectron2", "--force --sdist {w}/nope.tar.gz", 1,
     r"--sdist \S*nope\.tar\.gz does not exist"),
    ("install-sdist-directory", "install_detectron2", "--force --sdist {w}", 1,
     r"--sdist \S+ is a directory"),
    # --- run_benchmark
    ("benchmark-grid-missing", "run_benchmark", "{w}/nope.yaml --dry-run", 1, r"nope\.yaml"),
    ("benchmark-bad-set", "run_benchmark", "det_configs/grids/demo.yaml --dry-run --set novalue",
     1, r"novalue"),
    # --- make_synthetic_data
    ("synthetic-bad-size", "make_synthetic_data", "--out {w}/s --size 12by3", 2, r"12by3"),
    ("synthetic-out-is-file", "make_synthetic_data", "--out {w}/a_file --num-train 2 "
     "--num-val 2", 1, r"a_file"),
]


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.mark.parametrize("name,tool_name,argv,code,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, tool_name, argv, code, pattern, ws, synth_env, capsys):
    args = argv.format(w=ws, d=DET).split()
    before = snapshot(ws)
    main = tool(tool_name).main
    with _cwd(REPO):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse
            rc = e.code
    out, err = capsys.readouterr()
    text = out + err
    assert rc == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [l for l in text.splitlines() if re.match(r"^(\S+: )?error: ", l)]
    assert len(errors) == 1, text[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert snapshot(ws) == before, "a failing command changed or added files"
