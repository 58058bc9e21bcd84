"""The report's run identity and uncertainty, on fixture runs with known numbers written in the
formats the real tools write (fingerprints from loco_det.fingerprint, as the tools record them):
rows by fingerprint never by label, repeats flagged, paired t intervals and verdicts."""
import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from loco_det import fingerprint as fp
from loco_det.pretrain.config import load_config
from loco_det.report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def pretrain_run(d, recipe, seed, loss, *overrides, finished=True, metrics_lines=None):
    """A pretraining run as tools/pretrain.py leaves it: config.yaml (the full resolved recipe),
    run_info.json and checkpoint with the fingerprint, metrics.jsonl, summary.json."""
    cfg = load_config(os.path.join(ROOT, "pretrain", recipe + ".yaml"),
                      [f"SEED={seed}", *overrides])
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/config.yaml", "w") as f:
        f.write(cfg.dump())
    _json(f"{d}/run_info.json", {"kind": "pretrain", "method": cfg.MODEL.METHOD,
                                 "arch": cfg.MODEL.ARCH, "world_size": 1,
                                 "global_batch": cfg.OPTIM.BATCH_SIZE, "epochs": cfg.OPTIM.EPOCHS,
                                 "config_file": f"pretrain/{recipe}.yaml",
                                 "fingerprint": fp.pretrain_fingerprint(cfg)})
    with open(f"{d}/metrics.jsonl", "w") as f:
        for line in metrics_lines if metrics_lines is not None else [
                json.dumps({"step": i, "loss/unit1": loss + 1.0 / (i + 1)}) for i in range(3)]:
            f.write(line + "\n")
    if finished:
        _json(f"{d}/summary.json", {"finished": True, "final_losses": {"unit1": loss}})
    open(f"{d}/checkpoint_last.pth", "wb").close()
    return cfg


def readout_run(d, pre_dir, pre_cfg, res5, seed=0, lr=0.1):
    protocol = {"name": "small", "epochs": 10, "lr": lr, "batch_size": 64, "image_size": 64,
                "train_images": 100, "val_images": 50, "seed": seed}
    ckpt_fp = fp.pretrain_fingerprint(pre_cfg)
    _json(f"{d}/readout.json", {
        "kind": "readout", "checkpoint": f"{pre_dir}/checkpoint_last.pth",
        "method": pre_cfg.MODEL.METHOD, "arch": "resnet18",
        "top1": {"res2": 1.0, "res3": 2.0, "res4": 3.0, "res5": res5}, "protocol": protocol,
        "checkpoint_fingerprint": ckpt_fp, "checkpoint_seed": int(pre_cfg.SEED),
        "fingerprint": fp.readout_fingerprint(protocol, ckpt_fp)})


def det_run(d, label, ap_bb, seed, pre_dir=None, pre_cfg=None, config="cpu_synth_coco_R18_FPN_frozen",
            published=False, freeze_at=5, norm="FrozenBN"):
    """A detection run as tools/train_net.py leaves it (config.yaml trimmed to the keys that
    matter here; the fingerprint is computed from it exactly as train_net does)."""
    if pre_cfg is not None:
        weights_fp, wseed, source = (fp.pretrain_fingerprint(pre_cfg), int(pre_cfg.SEED),
                                     f"{pre_dir}/checkpoint_last.pth")
    elif published:
        weights_fp, wseed, source = "sha256:0123456789abcdef", None, None
    else:
        weights_fp, wseed, source = fp.RANDOM_INIT, None, None
    cfg = {"SEED": seed, "OUTPUT_DIR": d, "MODEL": {"WEIGHTS": "w.pkl" if weights_fp !=
                                                    fp.RANDOM_INIT else "",
                                                    "BACKBONE": {"FREEZE_AT": freeze_at},
                                                    "RESNETS": {"NORM": norm}},
           "DATASETS": {"TRAIN": ["loco_synth_coco_train"], "TEST": ["loco_synth_coco_val"]},
           "SOLVER": {"MAX_ITER": 100, "IMS_PER_BATCH": 4},
           "LOCO_DET": {"LABEL": label, "CONFIG_NAME": config,
                        "FROM_SCRATCH": weights_fp == fp.RANDOM_INIT,
                        "WEIGHTS_FINGERPRINT": weights_fp,
                        "WEIGHTS_SEED": -1 if wseed is None else wseed,
                        "WEIGHTS_SOURCE": source or ""}}
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    _json(f"{d}/run_info.json", {"kind": "detection", "world_size": 1, "argv": []})
    _json(f"{d}/results.json", {
        "kind": "detection", "finished": True, "method": label,
        "bbox": {"AP": ap_bb, "AP50": ap_bb, "AP75": ap_bb},
        "segm": {"AP": ap_bb - 1, "AP50": ap_bb, "AP75": ap_bb},
        "protocol": {"config_name": config, "benchmark": "coco", "max_iter": 100,
                     "frozen": freeze_at >= 5, "freeze_at": freeze_at, "world_size": 1,
                     "global_batch": 4, "weights": cfg["MODEL"]["WEIGHTS"], "seed": seed,
                     "from_scratch": weights_fp == fp.RANDOM_INIT},
        "fingerprint": fp.detection_fingerprint(cfg, weights_fp),
        "weights_fingerprint": weights_fp, "weights_seed": wseed, "weights_source": source})


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("runs"))
    # e2e, plain decoder, 3 seeds; e2e with LoCo's decoder, 3 seeds; loco, 3 seeds; supervised
    pre = {}
    for s in range(3):
        pre["e2e", s] = (f"{r}/pretrain/e2e/seed{s}",
                         pretrain_run(f"{r}/pretrain/e2e/seed{s}", "cpu_e2e", s, 4.0 + s))
        pre["e2e_deep", s] = (f"{r}/pretrain/e2e_deep/seed{s}",
                              pretrain_run(f"{r}/pretrain/e2e_deep/seed{s}", "cpu_e2e", s, 3.0,
                                           "MODEL.DECODER.CONV_BLOCKS=1"))
        pre["loco", s] = (f"{r}/pretrain/loco/seed{s}",
                          pretrain_run(f"{r}/pretrain/loco/seed{s}", "cpu_loco", s, 5.0))
    # a loco pretraining whose metrics.jsonl is all garbage
    pretrain_run(f"{r}/pretrain/gim/seed0", "cpu_gim", 0, 6.0,
                 metrics_lines=["not json", "{broken", "\x00\x01"])
    # detection, same label "e2e" for both pretrainings (as a careless grid would write):
    # plain e2e AP 10 on every seed; deep-decoder e2e AP 34; loco AP 11, 12, 13 (differences
    # to e2e [1, 2, 3] paired over seeds 0-2); random init AP 5, one seed.
    for s in range(3):
        det_run(f"{r}/det/e2e/seed{s}", "e2e", 10.0, s, *pre["e2e", s])
        det_run(f"{r}/det/e2e_deep/seed{s}", "e2e", 34.0 + 0.5 * s, s, *pre["e2e_deep", s])
        det_run(f"{r}/det/loco/seed{s}", "loco", 11.0 + s, s, *pre["loco", s])
    det_run(f"{r}/det/random/seed0", "random", 5.0, 0)
    det_run(f"{r}/det/supervised_published/seed0", "supervised (published weights)", 30.0, 0,
            published=True)
    # readout: loco seed 0 read out twice (a repeat), seeds 1 and 2 once; e2e with two readout
    # learning rates (two computations, never pooled)
    for s in range(3):
        readout_run(f"{r}/readout/loco/seed{s}", *pre["loco", s], res5=40.0 + s)
        readout_run(f"{r}/readout/e2e/seed{s}", *pre["e2e", s], res5=30.0 + s)
        readout_run(f"{r}/readout/e2e_lr1/seed{s}", *pre["e2e", s], res5=20.0 + s, lr=1.0)
    readout_run(f"{r}/readout/loco/seed0_again", *pre["loco", 0], res5=44.0, seed=7)
    out = tmp_path_factory.mktemp("report")
    md_path, rows = write_report([r], str(out))
    with open(md_path) as f:
        md = f.read()
    return {"md": md, "rows": rows, "csv": read_csv(out / "report.csv"),
            "cmp": read_csv(out / "comparisons.csv"), "runs": r}


def rows_of(report, section, metric):
    return {r["method"]: r for r in report["csv"]
            if r["section"] == section and r["metric"] == metric}


def test_two_pretrainings_of_one_method_give_two_rows(report):
    det = rows_of(report, "measured_detection", "APbb")
    assert det["e2e [MODEL.DECODER.CONV_BLOCKS=0]"]["mean"] == "10.0"
    deep = det["e2e [MODEL.DECODER.CONV_BLOCKS=1]"]
    assert float(deep["mean"]) == 34.5 and deep["n"] == "3" and deep["decoder"] == "conv 1, mlp 2"
    assert "e2e" not in det   # never pooled into one "e2e 22.25 ± 13" row
    pre = rows_of(report, "measured_pretrain", "final_loss/unit1")
    assert {k for k in pre if k.startswith("e2e")} == {"e2e [MODEL.DECODER.CONV_BLOCKS=0]",
                                                      "e2e [MODEL.DECODER.CONV_BLOCKS=1]"}


def test_three_seeds_of_one_recipe_give_one_row_with_n3(report):
    loco = rows_of(report, "measured_detection", "APbb")["loco"]
    assert loco["n"] == "3" and loco["seeds"] == "0,1,2" and float(loco["mean"]) == 12.0
    assert float(loco["std"]) == 1.0 and loco["status"] == "ok"


def test_readout_optimiser_overrides_are_not_pooled(report):
    e2e = sorted((r["lr"], r["mean"], r["n"]) for r in report["csv"]
                 if r["section"] == "measured_readout" and r["metric"] == "top1/res5"
                 and r["method"] == "e2e")
    assert e2e == [("0.1", "31.0", "3"), ("1.0", "21.0", "3")]   # the lr column tells them apart


def test_same_seed_twice_is_a_repeat_counted_once(report):
    loco = rows_of(report, "measured_readout", "top1/res5")["loco"]
    assert loco["n"] == "3" and loco["seeds"] == "0,1,2" and loco["repeats"] == "0x2"
    assert "repeat: seed 0 run 2x (counted once)" in loco["status"]
    # seed 0's value is the mean of its two readouts (40, 44): (42 + 41 + 42) / 3
    assert float(loco["mean"]) == pytest.approx((42.0 + 41.0 + 42.0) / 3)


def test_paired_differences_1_2_3_give_2_pm_2484_better(report):
    (c,) = [c for c in report["cmp"] if c["method"] == "loco" and c["metric"] == "APbb"
            and c["vs"] == "e2e [MODEL.DECODER.CONV_BLOCKS=0]"]
    assert c["test"] == "paired" and float(c["df"]) == 2.0 and c["n_a"] == "3"
    assert float(c["diff"]) == pytest.approx(2.0)
    assert float(c["halfwidth"]) == pytest.approx(2.484, abs=5e-4)
    assert c["verdict"] == "better"
    assert "| loco | e2e [MODEL.DECODER.CONV_BLOCKS=0] | +2.00 | +2.00 ± 2.48 [-0.48, +4.48] " \
           "| paired, df 2 | 3, 3 | better |" in report["md"]


def test_single_run_is_not_resolved(report):
    vs_random = [c for c in report["cmp"] if c["vs"] == "random" and c["metric"] == "APbb"]
    assert {c["method"] for c in vs_random} >= {"loco", "e2e [MODEL.DECODER.CONV_BLOCKS=1]",
                                                "supervised (published weights)"}
    for c in vs_random:
        assert c["verdict"] == "not resolved (1 run)" and c["ci_low"] == "" and c["test"] == "-"
    assert "not resolved (1 run)" in report["md"]


def test_supervised_rows_are_labelled_by_kind(report):
    det = rows_of(report, "measured_detection", "APbb")
    assert det["supervised (published weights)"]["weights"] == "published"
    assert det["random"]["weights"] == "random init"
    assert det["loco"]["weights"] == "cpu_loco"


def test_unreadable_metrics_lines_are_noted(report):
    gim = rows_of(report, "measured_pretrain", "final_loss/unit1")["gim"]
    assert gim["status"] == "ok; metrics.jsonl: 3 of 3 lines unreadable"


def test_misspelt_run_directory_is_one_line_error(report, tmp_path):
    tool = os.path.join(ROOT, "tools", "report.py")
    res = subprocess.run([sys.executable, tool, report["runs"], str(tmp_path / "runz"), "--out",
                          str(tmp_path / "rep")], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {tmp_path / 'runz'}: directory does not exist"
    assert not (tmp_path / "rep").exists()


def test_reference_option(report, tmp_path):
    tool = os.path.join(ROOT, "tools", "report.py")
    res = subprocess.run([sys.executable, tool, report["runs"], "--out", str(tmp_path / "rep"),
                          "--reference", "loco"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cmp = read_csv(tmp_path / "rep" / "comparisons.csv")
    (c,) = [c for c in cmp if c["method"] == "e2e [MODEL.DECODER.CONV_BLOCKS=0]"
            and c["vs"] == "loco" and c["metric"] == "APbb"]
    assert float(c["diff"]) == pytest.approx(-2.0) and c["verdict"] == "worse"


def test_readouts_on_different_data_are_never_compared(tmp_path):
    """Every row and comparison names its data set (the generator in meta.json, the embedded
    data's view): e2e and loco read out on the digits and on the embedded objects with the
    same protocol form two comparison groups, each named, never one."""
    r = tmp_path / "runs"
    data = {"digits": tmp_path / "digits32", "embedded objects": tmp_path / "synth" / "objects"}
    _json(f"{data['digits']}/meta.json", {"generator": "loco_det.digits"})
    _json(f"{tmp_path}/synth/meta.json", {"generator": "loco_det.synthetic"})
    for s in range(2):
        for method in ("e2e", "loco"):
            d, cfg = f"{r}/pretrain/{method}/seed{s}", None
            cfg = pretrain_run(d, f"cpu_{method}", s, 4.0)
            for name, folder in data.items():
                ro = f"{r}/readout/{name.split()[-1]}/{method}/seed{s}"
                readout_run(ro, d, cfg, res5=(50.0 if method == "loco" else 40.0) + s)
                rec = json.loads(open(f"{ro}/readout.json").read())
                rec["protocol"]["data_dir"] = str(folder)
                _json(f"{ro}/readout.json", rec)
    write_report([str(r)], str(tmp_path / "report"))
    comps = [c for c in read_csv(tmp_path / "report" / "comparisons.csv")
             if c["metric"] == "top1/res5" and c["method"] == "loco" and c["vs"] == "e2e"]
    assert sorted(c["dataset"] for c in comps) == ["digits", "embedded objects"], comps
    assert all(c["protocol"].startswith(c["dataset"] + ": ") for c in comps), comps
    assert all((c["n_a"], c["n_b"]) == ("2", "2") for c in comps), comps
    rows = [x for x in read_csv(tmp_path / "report" / "report.csv")
            if x["section"] == "measured_readout" and x["metric"] == "top1/res5"]
    assert sorted((x["method"], x["dataset"], x["n"]) for x in rows) == [
        ("e2e", "digits", "2"), ("e2e", "embedded objects", "2"), ("loco", "digits", "2"),
        ("loco", "embedded objects", "2")], rows


def test_knn_monitor_curves_are_plotted_against_random_init(tmp_path, monkeypatch):
    """The kNN monitor's records in metrics.jsonl (RUN.KNN_PERIOD) become one learning curve
    per rule and seed, drawn beside the random-init kNN readout of the same data set; runs
    without monitor records give no such plot."""
    r = tmp_path / "runs"
    _json(f"{tmp_path}/digits32/meta.json", {"generator": "loco_det.digits"})
    for s in range(2):
        lines = [json.dumps({"step": i, "loss/unit1": 4.0 - i}) for i in range(4)]
        lines += [json.dumps({"step": 2 * e, "epoch": e, "knn/k20/res5": 50.0 + 10 * e + s,
                              "knn/k200/res5": 40.0}) for e in (1, 2)]
        pretrain_run(f"{r}/pretrain/e2e/seed{s}", "cpu_e2e", s, 4.0,
                     f"DATA.ROOT={tmp_path}/digits32/train", metrics_lines=lines)
    ro = r / "readout" / "random" / "seed0"
    protocol = {"name": "small", "epochs": 10, "lr": 0.1, "batch_size": 64, "image_size": 32,
                "train_images": 100, "val_images": 50, "seed": 0,
                "data_dir": f"{tmp_path}/digits32"}
    _json(f"{ro}/readout.json", {"kind": "readout", "checkpoint": None, "method": "random",
                                 "arch": "resnet18", "top1": {"res5": 30.0},
                                 "protocol": protocol, "checkpoint_seed": 0})
    _json(f"{ro}/knn.json", {"kind": "knn", "method": "random", "arch": "resnet18",
                             "top1": {"k20": {"res5": 41.0}, "k200": {"res5": 35.0}},
                             "protocol": {"temperature": 0.07, "image_size": 32,
                                          "train_images": 100, "val_images": 50}})
    from loco_det.report import plots

    drawn = {}   # the kNN figure's panels: title -> (curves, horizontal lines)

    def keep(fig, path):
        if path.endswith("knn_during_pretraining.png"):
            for ax in fig.axes:
                lines = [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines]
                flat = [ln for ln in lines if ln[0] == [0, 1] and len(set(ln[1])) == 1]
                drawn[ax.get_title()] = ([ln for ln in lines if ln not in flat],
                                         [ln[1][0] for ln in flat])   # axhline: x in 0..1
        save(fig, path)

    save = plots._save
    monkeypatch.setattr(plots, "_save", keep)
    md_path, rows = write_report([str(r)], str(tmp_path / "report"))
    # one panel per k and stage; each seed's curve in its panel, the random-init readout of
    # the same k and stage beside it (stages without records: empty panels, no baseline)
    assert sorted(drawn) == sorted(f"digits: res{s}, k={k}" for k in (20, 200)
                                   for s in (2, 3, 4, 5))
    assert sorted(drawn["digits: res5, k=20"][0]) == [([2, 4], [60.0, 70.0]),
                                                      ([2, 4], [61.0, 71.0])]
    assert drawn["digits: res5, k=20"][1] == [41.0]
    assert drawn["digits: res5, k=200"] == ([([2, 4], [40.0, 40.0])] * 2, [35.0])
    assert drawn["digits: res2, k=20"] == ([], [])
    (row,) = rows["pretrain"]
    assert row.protocol["dataset"] == "digits"
    assert sorted(run.knn_curves["k20/res5"] for run in row.runs) == [
        ([2, 4], [60.0, 70.0]), ([2, 4], [61.0, 71.0])]
    assert all(run.curves["unit1"] == ([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0]) for run in row.runs)
    (random,) = [x for x in rows["readout"] if x.runs]
    assert random.protocol["dataset"] == "digits" and random.stat("knn/k20/res5")[0] == 41.0
    md = open(md_path).read()
    assert "](plots/knn_during_pretraining.png)" in md
    png = tmp_path / "report" / "plots" / "knn_during_pretraining.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    # the same runs without the monitor's records: no such plot, and no reference to one
    for path in (r / "pretrain").glob("e2e/seed*/metrics.jsonl"):
        path.write_text("".join(l + "\n" for l in path.read_text().splitlines()
                                if "knn/" not in l))
    md_path, _ = write_report([str(r)], str(tmp_path / "report2"))
    assert "knn_during_pretraining" not in open(md_path).read()
    assert not (tmp_path / "report2" / "plots" / "knn_during_pretraining.png").exists()
