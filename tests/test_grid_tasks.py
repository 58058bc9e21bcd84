"""The paper grid's VOC, semantic-segmentation and kNN jobs (tools/run_benchmark.py --dry-run):
every method and both baselines on each new config, with the commands a user would type."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["simclr_r50_100ep", "gim_r50_100ep", "loco_r50_100ep", "simclr_r50_800ep",
           "gim_r50_800ep", "loco_r50_800ep", "random", "supervised"]


def test_paper_grid_lists_voc_sem_seg_and_knn_jobs():
    res = subprocess.run([sys.executable, "tools/run_benchmark.py", "det_configs/grids/paper.yaml",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if not line.startswith("#")]
    det = [c for c in cmds if "tools/train_net.py" in c]
    for config, seeds in (("voc0712_R50_C4_24k_moco", range(1, 6)),
                          ("voc0712_R50_C4_24k_frozen", range(1, 6)),
                          ("cityscapes_sem_seg_R50_FPN_frozen", [0]),
                          ("cityscapes_sem_seg_R50_FPN_finetune", [0])):
        runs = [c for c in det if f"det_configs/{config}.yaml" in c]
        assert len(runs) == len(SOURCES) * len(seeds)
        assert {c[c.index("LOCO_DET.LABEL") + 1] for c in runs} == set(SOURCES)
        assert {c[c.index("SEED") + 1] for c in runs} == {str(s) for s in seeds}
        for c in runs:
            label, seed = c[c.index("LOCO_DET.LABEL") + 1], c[c.index("SEED") + 1]
            out = c[c.index("OUTPUT_DIR") + 1]
            assert out.startswith(f"runs/paper/det/{config}/{label}") and out.endswith(
                f"/seed{seed}")
            weights = c[c.index("MODEL.WEIGHTS") + 1]
            if label == "random":
                assert weights == "" and c[c.index("LOCO_DET.FROM_SCRATCH") + 1] == "True"
            elif label == "supervised":
                assert weights == "runs/paper/weights/supervised.pkl"
            else:
                assert weights == f"runs/paper/weights/{label}_seed0.pkl"
    knn = [c for c in cmds if "tools/knn_readout.py" in c]
    assert len(knn) == 7
    readouts = {c[c.index("--output-dir") + 1] for c in cmds if "tools/linear_readout.py" in c}
    assert {c[c.index("--output-dir") + 1] for c in knn} == readouts  # knn.json beside
    (random,) = [c for c in knn if "--random-init" in c]
    assert random[random.index("--arch") + 1] == "resnet50"
    for c in knn:
        assert c[c.index("--data") + 1] == "datasets/imagenet"
