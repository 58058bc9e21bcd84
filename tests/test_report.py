"""tools/report.py on fixture run directories with known numbers (formats: docs/formats.md)."""
import csv
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import yaml

from loco_det.report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _yaml(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(obj, f)


def make_pretrain(d, method, recipe, seed, losses, finished=True, world_size=1, batch=32,
                  epochs=2):
    _json(f"{d}/run_info.json", {"kind": "pretrain", "method": method, "arch": "resnet18",
                                 "world_size": world_size, "global_batch": batch,
                                 "epochs": epochs, "config_file": f"pretrain/{recipe}.yaml"})
    _yaml(f"{d}/config.yaml", {"SEED": seed, "MODEL": {"METHOD": method, "ARCH": "resnet18"}})
    with open(f"{d}/metrics.jsonl", "w") as f:
        for step in range(5):
            rec = {"step": step, "epoch": 0, "lr": 0.1}
            rec.update({f"loss/{u}": v + 1.0 / (step + 1) for u, v in losses.items()})
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 5, "loss/un')  # torn last line of a killed run
    if finished:
        _json(f"{d}/summary.json", {"finished": True, "epochs": epochs, "steps": 5,
                                    "final_losses": losses, "wall_time_s": 10.0})
    with open(f"{d}/checkpoint_last.pth", "wb") as f:
        f.write(b"x")


def make_readout(d, method, checkpoint, top1):
    _json(f"{d}/readout.json", {
        "kind": "readout", "checkpoint": checkpoint, "method": method, "arch": "resnet18",
        "top1": top1, "protocol": {"epochs": 10, "lr": 0.1, "batch_size": 64,
                                   "train_images": 100, "val_images": 50, "image_size": 64}})


def make_det(d, label, config, ap_bb, ap_mk, seed, benchmark="coco", world_size=1, batch=2,
             max_iter=100, freeze_at=5, train="loco_synth_coco_train", finished=True):
    _json(f"{d}/run_info.json", {"kind": "detection", "world_size": world_size,
                                 "argv": ["tools/train_net.py", "--config-file",
                                          f"det_configs/{config}.yaml"]})
    _yaml(f"{d}/config.yaml", {"SEED": seed, "DATASETS": {"TRAIN": [train]},
                               "SOLVER": {"MAX_ITER": max_iter, "IMS_PER_BATCH": batch},
                               "MODEL": {"BACKBONE": {"FREEZE_AT": freeze_at}}})
    res = {"kind": "detection", "bbox": {"AP": ap_bb, "AP50": ap_bb + 10, "AP75": ap_bb - 5},
           "segm": {"AP": ap_mk, "AP50": ap_mk + 10, "AP75": ap_mk - 5}, "metrics": {},
           "method": label,
           "protocol": {"config_name": config, "benchmark": benchmark, "max_iter": max_iter,
                        "frozen": freeze_at >= 5, "freeze_at": freeze_at,
                        "world_size": world_size, "global_batch": batch, "weights": "w.pkl",
                        "seed": seed}}
    if finished:
        res["finished"] = True
    _json(f"{d}/results.json", res)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def find(rows, **kw):
    hits = [r for r in rows if all(r[k] == str(v) for k, v in kw.items())]
    assert len(hits) == 1, (kw, hits)
    return hits[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    r = str(runs)
    # Pretraining: loco x 3 seeds (known losses), e2e x 1, gim unfinished.
    loco_losses = [{"unit1": 4.0, "unit2": 5.0, "unit3": 6.0},
                   {"unit1": 4.5, "unit2": 5.5, "unit3": 6.0},
                   {"unit1": 5.0, "unit2": 6.5, "unit3": 6.0}]
    for s, losses in enumerate(loco_losses):
        make_pretrain(f"{r}/pretrain/loco/seed{s}", "loco", "cpu_loco", s, losses)
    make_pretrain(f"{r}/pretrain/e2e/seed0", "e2e", "cpu_e2e", 0, {"unit1": 3.25})
    make_pretrain(f"{r}/pretrain/gim/seed0", "gim", "cpu_gim", 0,
                  {f"unit{i}": 1.0 for i in range(1, 5)}, finished=False)
    # Readout: loco x 3 (linked to the pretraining runs), random x 1.
    top1 = [(20.0, 30.0, 40.0, 50.0), (22.0, 31.0, 41.0, 52.5), (24.0, 35.0, 39.0, 51.0)]
    for s, t in enumerate(top1):
        make_readout(f"{r}/readout/loco/seed{s}", "loco",
                     f"{r}/pretrain/loco/seed{s}/checkpoint_last.pth", dict(zip(
                         ("res2", "res3", "res4", "res5"), t)))
    make_readout(f"{r}/readout/random", "random", None,
                 {"res2": 10.0, "res3": 11.0, "res4": 12.0, "res5": 13.0})
    # Detection: loco on coco frozen, 3 seeds; loco on cityscapes, 1 seed; loco on coco frozen
    # with another world size/batch (must not be averaged in); random on 5 coco-10k splits;
    # one unfinished run (results.json without finished).
    for s, (bb, mk) in enumerate([(30.0, 28.0), (31.5, 29.0), (33.0, 31.0)]):
        make_det(f"{r}/det/coco_frozen/loco/seed{s}", "loco", "cpu_synth_coco_R18_FPN_frozen",
                 bb, mk, s)
    make_det(f"{r}/det/cs_frozen/loco/seed0", "loco", "cpu_synth_cityscapes_R18_FPN_frozen",
             17.25, 12.5, 0, benchmark="cityscapes")
    make_det(f"{r}/det/coco_frozen_8gpu/loco/seed0", "loco", "cpu_synth_coco_R18_FPN_frozen",
             40.0, 38.0, 0, world_size=8, batch=16)
    for s, bb in enumerate([20.0, 21.0, 22.0, 23.0, 24.0]):
        make_det(f"{r}/det/coco10k/random/seed{s}", "random", "coco10k_R50_FPN_finetune", bb,
                 bb - 1, s, freeze_at=2, max_iter=60000, train=f"coco_2017_train_10k_seed{s}")
    make_det(f"{r}/det/coco_frozen/gim/seed0", "gim", "cpu_synth_coco_R18_FPN_frozen", 0.0, 0.0,
             0, finished=False)
    # Manifest of the benchmark (jobs carry their id, as tools/run_benchmark.py writes them): a
    # supervised run that was never produced, one loco seed that is missing (counts into the
    # loco cityscapes row), a label override for the e2e pretraining run, and a baseline the
    # grid did not request (no job id: published weights it was not given).
    _json(f"{r}/benchmark.json", {"kind": "benchmark_manifest", "jobs": [
        {"kind": "detection", "id": "det/coco_frozen/supervised/seed0", "label": "supervised",
         "config": "cpu_synth_coco_R18_FPN_frozen",
         "output": "det/coco_frozen/supervised/seed0", "seed": 0,
         "note": "no supervised weights in the grid"},
        {"kind": "detection", "id": "det/cs_frozen/loco/seed3", "label": "loco",
         "config": "cpu_synth_cityscapes_R18_FPN_frozen",
         "output": "det/cs_frozen/loco/seed3", "seed": 3},
        {"kind": "pretrain", "id": "pretrain/e2e/seed0", "label": "e2e", "config": "cpu_e2e",
         "output": "pretrain/e2e/seed0"},
        {"kind": "detection", "label": "supervised (published weights)",
         "config": "cpu_synth_coco_R18_FPN_frozen",
         "output": "det/coco_frozen/supervised_published/seed0", "seed": 0,
         "note": "no published supervised-ImageNet weights given in the grid"},
    ]})
    out = tmp_path_factory.mktemp("report")
    md_path, _ = write_report([r], str(out))
    with open(md_path) as f:
        md = f.read()
    return {"md": md, "csv": read_csv(out / "report.csv"), "out": out, "runs": r,
            "loco_losses": loco_losses, "top1": top1}


def test_means_and_sample_stds_are_exact(report):
    rows = report["csv"]
    ap = find(rows, section="measured_detection", method="loco", metric="APbb",
              config="cpu_synth_coco_R18_FPN_frozen", world_size=1)
    assert float(ap["mean"]) == statistics.fmean([30.0, 31.5, 33.0]) == 31.5
    assert float(ap["std"]) == statistics.stdev([30.0, 31.5, 33.0]) == 1.5
    assert ap["n"] == "3" and ap["seeds"] == "0,1,2"
    mk = find(rows, section="measured_detection", method="loco", metric="APmk",
              config="cpu_synth_coco_R18_FPN_frozen", world_size=1)
    assert float(mk["mean"]) == statistics.fmean([28.0, 29.0, 31.0])
    assert float(mk["std"]) == statistics.stdev([28.0, 29.0, 31.0])
    for i, unit in enumerate(("unit1", "unit2", "unit3")):
        vals = [l[unit] for l in report["loco_losses"]]
        row = find(rows, section="measured_pretrain", method="loco", metric=f"final_loss/{unit}")
        assert float(row["mean"]) == statistics.fmean(vals)
        assert float(row["std"]) == statistics.stdev(vals)
    for i, stage in enumerate(("res2", "res3", "res4", "res5")):
        vals = [t[i] for t in report["top1"]]
        row = find(rows, section="measured_readout", method="loco", metric=f"top1/{stage}")
        assert float(row["mean"]) == statistics.fmean(vals)
        assert float(row["std"]) == statistics.stdev(vals)
        assert row["pretraining"] == "cpu_loco" and row["n"] == "3"
    md = report["md"]
    assert "| 31.50 ± 1.50 |" in md
    assert f"| {statistics.fmean([28.0, 29.0, 31.0]):.2f} ± " \
           f"{statistics.stdev([28.0, 29.0, 31.0]):.2f} |" in md


def test_single_run_shows_value_and_n1(report):
    row = find(report["csv"], section="measured_detection", method="loco", metric="APbb",
               benchmark="cityscapes")
    assert row["mean"] == "17.25" and row["std"] == "" and row["n"] == "1"
    assert "| 17.25 | 12.50 |" in report["md"]
    assert "| 1 of 2 | 0 | 1 missing |" in report["md"]
    e2e = find(report["csv"], section="measured_pretrain", method="e2e",
               metric="final_loss/unit1")
    assert e2e["mean"] == "3.25" and e2e["n"] == "1"


def test_random_splits_form_one_row(report):
    row = find(report["csv"], section="measured_detection", method="random", metric="APbb")
    assert row["n"] == "5" and row["train_set"] == "coco_2017_train_10k_seed*"
    assert float(row["mean"]) == 22.0
    assert float(row["std"]) == statistics.stdev([20.0, 21.0, 22.0, 23.0, 24.0])
    assert row["backbone"] == "fine-tuned (FREEZE_AT 2)" and row["schedule"] == "60000 it"


def test_protocols_are_kept_apart(report):
    loco = [r for r in report["csv"] if r["section"] == "measured_detection"
            and r["method"] == "loco" and r["metric"] == "APbb"
            and r["config"] == "cpu_synth_coco_R18_FPN_frozen"]
    assert sorted((r["world_size"], r["global_batch"], r["n"], r["mean"]) for r in loco) == \
        [("1", "2", "3", "31.5"), ("8", "16", "1", "40.0")]
    # every measured detection table states what its rows share (config, schedule, world
    # size, batch) in the line above it, and what may differ (backbone, init) in its columns
    det = report["md"].split("## Detection (Mask R-CNN), measured")[1].split("\n## ")[0]
    tables = det.split("\n### ")[1:]
    assert len(tables) == 4   # coco frozen at world size 1 and 8, cityscapes, coco-10k
    for table in tables:
        protocol = next(l for l in table.splitlines() if l.startswith("Protocol: "))
        for key in ("config", "train set", "schedule", "world size", "global batch"):
            assert key + " " in protocol
        header = next(l for l in table.splitlines() if l.startswith("| method |"))
        assert "| backbone |" in header and "| init |" in header
    assert sum("world size 8, global batch 16" in t for t in tables) == 1


def test_missing_and_unfinished_never_zero(report):
    rows, md = report["csv"], report["md"]
    sup = find(rows, section="measured_detection", method="supervised", metric="APbb")
    assert sup["mean"] == "" and sup["n"] == "0" and sup["status"] == "missing"
    gim = find(rows, section="measured_detection", method="gim", metric="APbb")
    assert gim["mean"] == "" and gim["status"] == "unfinished"
    gim_pre = find(rows, section="measured_pretrain", method="gim", metric="final_loss/unit1")
    assert gim_pre["mean"] == "" and gim_pre["status"] == "unfinished"
    loco = find(rows, section="measured_detection", method="loco", metric="APbb",
                benchmark="cityscapes")
    assert loco["n_missing"] == "1" and loco["status"] == "1 missing" and loco["n"] == "1"
    sup_line = next(l for l in md.splitlines() if l.startswith("| supervised |"))
    assert "missing" in sup_line and "0.00" not in sup_line
    missing = md.split("## Missing or unfinished runs")[1].split("## Paper")[0]
    assert "no supervised weights in the grid" in missing
    assert "det/cs_frozen/loco/seed3" in missing
    assert "results.json without finished=true" in missing
    assert "no summary.json" in missing


def test_paper_numbers_in_their_own_section(report, tmp_path):
    md = report["md"]
    measured, paper = md.split("## Paper's reported numbers (not measured here)")
    for value in ("69.8", "33.9 / 31.3", "27.8 / 25.6", "2.5 / 2.5"):
        assert value in paper and value not in measured
    assert "## Detection" not in paper and "## Linear readout" not in paper
    with open(report["out"] / "report.csv") as f:
        assert "69.8" not in f.read()
    paper_rows = read_csv(report["out"] / "paper_reference.csv")
    assert {"source": "paper (not measured here)", "row": "800 ep LoCo", "column": "COCO-10K",
            "value": "27.8 / 25.6"}.items() <= find(paper_rows, row="800 ep LoCo",
                                                     column="COCO-10K").items()
    assert len(paper_rows) == 3 * 2 + 7 * 2 + 8 * 2 + 6


def test_plots_named_in_md_exist(report):
    md = report["md"]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == ["plots/detection_ap.png", "plots/pretrain_loss.png",
                              "plots/readout_top1.png"]
    for img in images:
        path = report["out"] / img
        assert path.stat().st_size > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(report["out"]) if p.startswith(".tmp")]


def test_cli_help_and_errors(tmp_path):
    tool = os.path.join(ROOT, "tools", "report.py")
    res = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Examples:" in res.stdout
    (tmp_path / "empty").mkdir()
    res = subprocess.run([sys.executable, tool, str(tmp_path / "empty"), "--out",
                          str(tmp_path / "rep")], capture_output=True, text=True)
    assert res.returncode != 0
    assert res.stderr.strip().startswith("error: no runs found")
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rep" / "report.md").exists()


def _tables(md):
    """[(first line, number of columns)] of every markdown table in `md`."""
    out, inside = [], False
    for line in md.splitlines():
        if line.startswith("|") and not inside:
            out.append((line, line.count(" | ") + 1))
        inside = line.startswith("|")
    return out


def test_report_opens_with_the_summary(report):
    md = report["md"]
    sections = [l for l in md.splitlines() if l.startswith("## ")]
    assert sections[0] == "## Summary"
    assert sections[-1] == "## Paper's reported numbers (not measured here)"
    first_table = md.index("\n|")
    assert md.index("## Summary") < first_table < md.index("\n## ", md.index("## Summary"))
    summary = md.split("## Summary")[1].split("\n## ")[0]
    # headline metric as mean ± std (n) and the verdict against the reference method
    loco = [l for l in summary.splitlines() if l.startswith("| loco |")]
    assert "31.50 ± 1.50 (3), no reference run" in loco[0]   # no e2e detection run here
    assert "17.25 (1 of 2), no reference run" in "".join(loco)
    random = next(l for l in summary.splitlines() if l.startswith("| random |"))
    assert "22.00 ± 1.58 (5), random init" in random
    readout = [l for l in summary.splitlines() if "51.17 ± 1.26 (3)" in l]
    assert len(readout) == 1 and readout[0].startswith("| loco |")
    # four detection protocols and one readout: split into tables of at most three columns
    heads = [line for line, n in _tables(summary)]
    assert len(heads) == 2 and all(h.count(" | ") <= 3 for h in heads)
    # one config under two protocols: two numbered columns, each spelt out below the tables
    for name in ("embedded, COCO view: cpu_synth_coco_R18_FPN_frozen (1)",
                 "embedded, COCO view: cpu_synth_coco_R18_FPN_frozen (2)"):
        assert f" {name}, APbb |" in "".join(heads)
        assert (f"- {name}: dataset embedded, COCO view, benchmark coco, config "
                "cpu_synth_coco_R18_FPN_frozen") in summary
    # missing and unfinished runs of the grid show as such in their column, never as numbers
    assert next(l for l in summary.splitlines() if l.startswith("| supervised |")).endswith(
        "| missing |")


def test_summary_verdict_is_the_comparison_against_the_reference(tmp_path):
    r = str(tmp_path / "runs")
    for s, (e2e, loco) in enumerate([(10.0, 11.0), (11.0, 13.0), (12.0, 15.0)]):
        make_det(f"{r}/e2e/{s}", "e2e", "cpu_synth_coco_R18_FPN_frozen", e2e, e2e, s)
        make_det(f"{r}/loco/{s}", "loco", "cpu_synth_coco_R18_FPN_frozen", loco, loco, s)
    md_path, _ = write_report([r], str(tmp_path / "out"))
    summary = open(md_path).read().split("## Summary")[1].split("\n## ")[0]
    assert "| loco | 13.00 ± 2.00 (3), better |" in summary
    assert "| e2e | 11.00 ± 1.00 (3), reference |" in summary
    cmp = read_csv(tmp_path / "out" / "comparisons.csv")
    assert find(cmp, method="loco", metric="APbb")["verdict"] == "better"


def test_unrequested_baseline_is_not_listed(report):
    assert "supervised (published weights)" not in report["md"]
    assert "supervised_published" not in report["md"]
    assert not [r for r in report["csv"] if "published" in r["method"]]


def test_wide_tables_are_split(report):
    for line, n in _tables(report["md"]):
        assert n <= 11, line


def test_plot_legends_sit_outside_the_axes_and_text_is_readable(report, tmp_path, monkeypatch):
    """Every legend is clear of the bars and curves (outside its axes) and no label is smaller
    than 7 pt at the size the PNG is written."""
    from loco_det import report as rep
    from loco_det.report import plots as rep_plots

    figures = []
    save = rep_plots._save

    def keep(fig, path):
        save(fig, path)   # draws the figure: the extents below are those of the PNG
        figures.append((os.path.basename(path), fig))

    monkeypatch.setattr(rep_plots, "_save", keep)
    rows = rep.build_rows(rep.collect([report["runs"]])[0])
    assert set(rep.make_plots(rows, str(tmp_path))) == {"pretrain", "readout", "detection"}
    assert len(figures) == 3
    for name, fig in figures:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            legend = ax.get_legend()
            assert legend is not None, name
            assert not legend.get_window_extent(renderer).overlaps(
                ax.get_window_extent(renderer)), f"{name}: legend over the plot"
            texts = ax.get_xticklabels() + ax.get_yticklabels() + legend.get_texts() + [
                ax.title, ax.xaxis.label, ax.yaxis.label]
            small = [t.get_text() for t in texts if t.get_text() and t.get_fontsize() < 7]
            assert not small, (name, small)


def test_knn_readouts_are_compared_with_intervals(tmp_path):
    """kNN top-1 at res5 (knn.json beside readout.json) is compared like linear readout: loco
    against e2e over three paired seeds, with the exact mean difference and a verdict."""
    r = str(tmp_path / "runs")
    stages = ("res2", "res3", "res4", "res5")
    for s, (e2e, loco) in enumerate([(80.0, 84.0), (81.0, 86.0), (82.0, 85.0)]):
        for method, value in (("e2e", e2e), ("loco", loco)):
            pre = f"{r}/pre/{method}/{s}"
            make_pretrain(pre, method, f"cpu_{method}", s, {"unit1": 1.0})
            ro = f"{r}/ro/{method}/{s}"
            make_readout(ro, method, f"{pre}/checkpoint_last.pth", dict.fromkeys(stages, 50.0))
            _json(f"{ro}/knn.json", {
                "kind": "knn", "method": method, "arch": "resnet18",
                "top1": {"k20": dict.fromkeys(stages, value),
                         "k200": dict.fromkeys(stages, value - 10)},
                "protocol": {"temperature": 0.07, "image_size": 32, "train_images": 100,
                             "val_images": 50}})
    md_path, _ = write_report([r], str(tmp_path / "out"))
    cmp = read_csv(tmp_path / "out" / "comparisons.csv")
    for metric in ("knn/k20/res5", "knn/k200/res5"):
        row = find(cmp, method="loco", vs="e2e", metric=metric)
        assert float(row["diff"]) == pytest.approx(4.0)   # differences 4, 5, 3 (paired)
        assert float(row["ci_low"]) > 0 and row["verdict"] == "better"
    # linear readout is equal in both: compared, and not resolved
    assert find(cmp, method="loco", vs="e2e", metric="top1/res5")["verdict"] == "not resolved"
    assert "| kNN k=20 res5 | loco | e2e | +4.00 |" in open(md_path).read()
