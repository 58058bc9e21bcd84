"""The paper grid's VOC, semantic-segmentation and kNN jobs (tools/run_benchmark.py --dry-run):
every method and both baselines on each new config, with the commands a user would type."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_grid_lists_voc_sem_seg_and_knn_jobs(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)   # inputs must exist (preflight)
    (tmp_path / "r50.pth").touch()
    res = subprocess.run([sys.executable, "tools/run_benchmark.py", "det_configs/grids/paper.yaml",
                          "--dry-run", "--set", f"vars.imagenet={tmp_path / 'imagenet'}", "--set",
                          f"detection.supervised_weights={tmp_path / 'r50.pth'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if not line.startswith("#")]
    sub = lambda c, name: c[1:4] == ["-m", "loco_det.cli", name]   # python -m loco_det.cli NAME
    det = [c for c in cmds if sub(c, "train")]
    # every source of the paper's COCO readout (each pretraining and both baselines), with the
    # same weights
    weights_of = {c[c.index("LOCO_DET.LABEL") + 1]: c[c.index("MODEL.WEIGHTS") + 1]
                  for c in det if "det_configs/coco_R50_FPN_1x_frozen.yaml" in c}
    assert "random" in weights_of and len(weights_of) >= 5
    for config, seeds in (("voc0712_R50_C4_24k_moco", range(1, 6)),
                          ("voc0712_R50_C4_24k_frozen", range(1, 6)),
                          ("cityscapes_sem_seg_R50_FPN_frozen", [0]),
                          ("cityscapes_sem_seg_R50_FPN_finetune", [0])):
        runs = [c for c in det if f"det_configs/{config}.yaml" in c]
        assert len(runs) == len(weights_of) * len(seeds)
        assert {c[c.index("LOCO_DET.LABEL") + 1] for c in runs} == set(weights_of)
        assert {c[c.index("SEED") + 1] for c in runs} == {str(s) for s in seeds}
        for c in runs:
            label, seed = c[c.index("LOCO_DET.LABEL") + 1], c[c.index("SEED") + 1]
            out = c[c.index("OUTPUT_DIR") + 1]
            assert out.startswith(f"runs/paper/det/{config}/") and out.endswith(f"/seed{seed}")
            weights = c[c.index("MODEL.WEIGHTS") + 1]
            assert weights == weights_of[label]
            if label == "random":
                assert weights == "" and c[c.index("LOCO_DET.FROM_SCRATCH") + 1] == "True"
    knn = [c for c in cmds if sub(c, "knn")]
    assert len(knn) == len([c for c in cmds if sub(c, "readout")])
    readouts = {c[c.index("--output-dir") + 1] for c in cmds if sub(c, "readout")}
    assert {c[c.index("--output-dir") + 1] for c in knn} == readouts  # knn.json beside
    (random,) = [c for c in knn if "--random-init" in c]
    assert random[random.index("--arch") + 1] == "resnet50"
    for c in knn:
        assert c[c.index("--data") + 1] == str(tmp_path / "imagenet")
