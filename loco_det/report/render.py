"""Rendering: report.md (summary, per-protocol tables, comparisons, the paper's numbers),
report.csv, comparisons.csv and paper_reference.csv."""
import csv
import io
import time

from ..records import STAGES
from .compare import (DEFAULT_REFERENCE, RANDOM_LABELS, _group_text, _is_random, _matches,
                      comparisons)
from .paper import PAPER_CITATION, PAPER_TABLES, paper_differences
from .rows import COMPARE_FREE, Row, group_key
from .runs import PROTOCOL_FIELDS

# VOC: Faster R-CNN box AP by PascalVOCDetectionEvaluator; sem seg: cityscapesscripts mIoU.
OTHER_TASKS = {"voc": ("VOC detection (Faster R-CNN), measured",
                       "AP in % by Detectron2's PascalVOCDetectionEvaluator (VOC07 11-point AP "
                       "on a 2007 test set); MoCo's protocol reports the mean of 5 trials.",
                       ("APbb50", "APbb", "APbb75")),
               "cityscapes_sem_seg": ("Cityscapes semantic segmentation, measured",
                                      "mIoU / iIoU in % by cityscapesscripts' pixel-level "
                                      "evaluation (CityscapesSemSegEvaluator).",
                                      ("mIoU", "iIoU"))}
KNN_KS = (20, 200)

def _metric_names(rows):
    names = []
    for row in rows:
        for run in row.runs:
            for m in run.metrics:
                if m not in names:
                    names.append(m)
    return sorted(names, key=lambda m: (m.startswith("wall"), m))


# ----------------------------------------------------------------------------- formatting

def fmt_stat(stat, digits=2):
    """'mean ± std' (n >= 2), the single value (n = 1); None -> ''."""
    if stat is None:
        return ""
    mean, std, n = stat
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(row, metric, digits=2):
    if not row.runs:
        return row.status()
    return fmt_stat(row.stat(metric), digits) or "n/a"


def _md_table(header, rows):
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _n_cell(row):
    """Distinct seeds (repeats are not extra n), with the expected total when runs are
    missing or unfinished."""
    n = len(row.by_seed())
    return str(n) if not row.others else f"{n} of {n + len(row.others)}"


_HEADERS = {"readout": "protocol", "weights": "init", "world_size": "world size",
            "global_batch": "global batch",
            "readout_epochs": "readout epochs", "batch_size": "batch", "image_size": "image px",
            "train_images": "train images", "train_set": "train set"}


def _fmt_comparison(c, digits=2):
    """('+2.00', '[-0.48, 4.48]' or '-', test, verdict) of a stats.Comparison."""
    diff = f"{c.diff:+.{digits}f}"
    ci = "-" if c.halfwidth is None else (
        f"{c.diff:+.{digits}f} ± {c.halfwidth:.{digits}f} [{c.low:+.{digits}f}, "
        f"{c.high:+.{digits}f}]")
    df = "-" if c.df is None else (f"{c.df:.0f}" if float(c.df).is_integer() else f"{c.df:.1f}")
    test = "-" if c.test == "-" else f"{c.test}, df {df}"
    return diff, ci, test, c.verdict


# Headline metric of each benchmark in the summary (higher is better).
HEADLINE = {"voc": "APbb", "cityscapes_sem_seg": "mIoU"}
# Benchmark columns per summary table: wider tables are split so that each reads on a screen.
SUMMARY_COLUMNS = 3


def _headline(row):
    if row.kind == "readout":
        return "top1/res5"
    return HEADLINE.get(row.protocol.get("benchmark"), "APbb")


def _metric_text(metric):
    if metric.startswith("knn/"):   # knn/k20/res5 -> kNN k=20 res5
        _, k, stage = metric.split("/")
        return f"kNN k={k[1:]} {stage}"
    return metric.replace("top1/", "top-1 ")


def _shared_protocol_text(row):
    """The protocol every row of `row`'s comparison group shares, as one line."""
    free = COMPARE_FREE.get(row.kind, ())
    return ", ".join(f"{_HEADERS.get(k, k)} {row.protocol.get(k, '?')}"
                     for k in PROTOCOL_FIELDS[row.kind] if k not in free)


def _groups(rows):
    """[(heading row, [rows])] per comparison group, in row order. Rows without finished runs
    (missing / unfinished) join the first group of their config or recipe, else their own."""
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault(group_key(row), []).append(row)
    for row in rows:
        if row.runs:
            continue
        name = row.protocol.get("config") or row.protocol.get("recipe")
        home = next((g for g in groups.values() if name and name in (
            g[0].protocol.get("config"), g[0].protocol.get("recipe"))), None)
        if home is not None:
            home.append(row)
        else:
            groups[("unmatched", row.kind, row.label, id(row))] = [row]
    return list(groups.values())


def _group_heading(grows):
    head = grows[0]
    if not head.runs:
        name = head.protocol.get("config") or head.protocol.get("recipe") or "?"
        return f"{name} (no finished run)", ""
    if head.kind == "detection":
        title = f"{head.protocol.get('benchmark')}: {head.protocol.get('config')}"
    else:
        title = (f"{head.protocol.get('arch')}, {head.protocol.get('readout')} readout, "
                 f"{head.protocol.get('train_images')} train images")
    return title, _shared_protocol_text(head)


def _free_cells(row):
    return [str(row.protocol.get(k, "-")) for k in COMPARE_FREE[row.kind]]


def _free_header(kind):
    return [_HEADERS.get(k, k) for k in COMPARE_FREE[kind]]


def _ordered_methods(rows, reference):
    """Row labels: the reference first, random init last, the rest sorted."""
    labels = sorted({r.label for r in rows})
    first = [l for l in labels if l == reference]
    last = [l for l in labels if l in RANDOM_LABELS]
    return first + [l for l in labels if l not in first and l not in last] + last


def render_summary(rows, comps, reference):
    """One table, method x benchmark: headline metric mean ± std (n) and the verdict against
    the reference method; split into tables of SUMMARY_COLUMNS benchmarks."""
    columns = []   # (name, metric, group text, {label: row})
    for kind in ("detection", "readout"):
        for grows in _groups(rows[kind]):
            if not grows[0].runs:
                continue
            head = grows[0]
            metric = _headline(head)
            if kind == "detection":
                name = str(head.protocol.get("config"))
            else:
                name = (f"readout ({head.protocol.get('readout')}, {head.protocol.get('arch')}, "
                        f"{head.protocol.get('image_size')} px)")
            dataset = head.protocol.get("dataset")
            if dataset and dataset != "?":   # a column says which data it measured
                name = f"{dataset}: {name}"
            columns.append([name, metric, _shared_protocol_text(head),
                            {r.label: r for r in grows}])
    md = ["## Summary", ""]
    if not columns:
        return md + ["No finished runs.", ""]
    seen = {}
    for col in columns:   # the same config under two protocols: number them
        seen[col[0]] = seen.get(col[0], 0) + 1
    count = {}
    for col in columns:
        if seen[col[0]] > 1:
            count[col[0]] = count.get(col[0], 0) + 1
            col[0] = f"{col[0]} ({count[col[0]]})"
    verdicts = {}   # (group, metric, method) -> [(reference row label, verdict)]
    for c in comps:
        if c["role"] == "reference":
            verdicts.setdefault((c["group"], c["metric"], c["method"]), []).append(
                (c["vs"], c["comparison"].verdict))
    methods = _ordered_methods([r for col in columns for r in col[3].values()], reference)
    md += [f"Headline metric per benchmark (column): mean ± sample std (n distinct seeds or "
           f"splits), then the verdict against the reference method `{reference}` (one-sided "
           "t test at 5%; the sections below give every interval). \"-\": not run under that "
           "protocol.", ""]

    def cell(label, name, metric, by_label):
        row = by_label.get(label)
        if row is None:
            return "-"
        if not row.runs:
            return row.status()
        stat = row.stat(metric)
        if stat is None:
            return "n/a"
        mean, std, _ = stat
        value = f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}") + f" ({_n_cell(row)})"
        if _matches(row, reference) and not _is_random(row):
            return value + ", reference"
        if _is_random(row):
            return value + ", random init"
        found = verdicts.get((_group_text(row), metric, row.label))
        if not found:
            return value + ", no reference run"
        if len(found) == 1:
            return value + ", " + found[0][1]
        return value + ", " + "; ".join(f"{v} vs {vs}" for vs, v in found)

    for i in range(0, len(columns), SUMMARY_COLUMNS):
        part = columns[i:i + SUMMARY_COLUMNS]
        header = ["method"] + [f"{name}, {_metric_text(metric)}" for name, metric, _, _ in part]
        body = [[label] + [cell(label, name, metric, by_label)
                           for name, metric, _, by_label in part]
                for label in methods if any(label in c[3] for c in part)]
        md += [_md_table(header, body), ""]
    md += ["Benchmarks:", ""]
    md += [f"- {name}: {text}" for name, _, text, _ in columns]
    md.append("")
    return md


def render_comparisons(comps, reference):
    md = ["## Comparisons, measured (difference, 95% interval, verdict)", "",
          f"Each method against the reference method (`{reference}`; `--reference` changes it) "
          "and against random init, within one protocol (the same benchmark, config, training "
          "set and schedule; for readout the same readout protocol). Cells: mean difference "
          "A - B (percentage points; higher is better), its two-sided 95% t interval (paired "
          "over shared seeds or splits when every run of both rows has a partner, Welch "
          "otherwise), and a verdict: **better** / **worse** when a one-sided t test at the 5% "
          "level in that direction says so, else **not resolved**. With a single run on "
          "either side there is no interval: the verdict is **not resolved (1 run)** and "
          "the ordering of the means says nothing.", ""]
    if not comps:
        md += ["No comparisons (no two measured rows under one protocol).", ""]
        return md
    header = ["metric", "method (A)", "vs (B)", "A - B", "95% interval", "test", "n (A, B)",
              "verdict"]
    by_group = {}
    for item in comps:
        by_group.setdefault(item["group"], []).append(item)
    for group, items in by_group.items():
        body = []
        for item in items:
            c = item["comparison"]
            diff, ci, test, verdict = _fmt_comparison(c)
            body.append([_metric_text(item["metric"]), item["method"], item["vs"], diff, ci,
                         test, f"{c.n_a}, {c.n_b}", verdict])
        md += [f"### {group}", "", _md_table(header, body), ""]
    unresolved = sum(1 for item in comps if item["comparison"].verdict.startswith("not"))
    md += [f"{unresolved} of {len(comps)} comparisons are not resolved.", ""]
    return md


def _measured_groups(rows, metrics, plot=None, plot_alt=""):
    """One table per comparison group: its shared protocol as a line, then one row per method
    with the fields that may differ, the metrics, n, seeds and status."""
    md = []
    for grows in _groups(rows):
        title, shared = _group_heading(grows)
        header = ["method"] + _free_header(grows[0].kind) + [_metric_text(m) for m in metrics] \
            + ["n", "seeds", "status"]
        body = [[r.label] + _free_cells(r) + [_cell(r, m) for m in metrics]
                + [_n_cell(r), r.seeds() or "-", r.status()] for r in grows]
        md += [f"### {title}", ""] + ([f"Protocol: {shared}.", ""] if shared else []) + [
            _md_table(header, body), ""]
    if plot:
        md += [f"![{plot_alt}]({plot})", f"Plot: `{plot}`", ""]
    return md


def render_markdown(rows, runs, plots, run_dirs, problems, reference=DEFAULT_REFERENCE):
    n_by = {k: sum(1 for r in runs if r.kind == k and r.status == "finished")
            for k in PROTOCOL_FIELDS}
    not_done = [r for r in runs if r.status != "finished"]
    comps = comparisons(rows, reference)
    md = ["# loco_det benchmark report", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
          + ", ".join(f"`{d}`" for d in run_dirs) + ".",
          f"Finished runs: {n_by['pretrain']} pretraining, {n_by['readout']} readout, "
          f"{n_by['detection']} detection; missing or unfinished: {len(not_done)}.", ""]
    for p in problems:
        md.append(f"- warning: {p}")
    if problems:
        md.append("")
    md += render_summary(rows, comps, reference)
    md += ["## How to read the tables", "",
           "Cells are mean ± sample standard deviation (ddof=1) over the n distinct seeds (or "
           "random splits) of one computation; with n=1 the single value is shown. A row is one "
           "run fingerprint (everything that defines what was computed except the seed; "
           "loco_det/fingerprint.py lists the run-only keys left out) under one protocol, never a "
           "label: two different pretrainings never share a row, and labels that collide get a "
           "suffix naming what differs. The same seed run twice is a repeat, counted once and "
           "flagged in the status column. Missing or unfinished runs are marked as such and "
           "never count as 0. Random init on a fine-tuning protocol trains the whole backbone "
           "from scratch (FREEZE_AT 0 with a trainable norm, see the backbone column); on a "
           "frozen protocol it stays frozen. Each table below is one protocol: the line above "
           "it gives what its rows share.", ""]

    md += ["## Detection (Mask R-CNN), measured", ""]
    det = [r for r in rows["detection"] if r.protocol.get("benchmark") not in OTHER_TASKS]
    if det:
        md += ["AP in %. APbb: box AP, APmk: mask AP.", ""]
        md += _measured_groups(det, ("APbb", "APmk", "APbb50", "APmk50"),
                               plots.get("detection"), "APbb and APmk per method and benchmark")
    else:
        md += ["No detection runs found.", ""]
    md += render_other_tasks(rows["detection"])

    md += ["## Linear readout, measured (top-1 %, frozen encoder, per stage)", ""]
    if rows["readout"]:
        md += _measured_groups(rows["readout"], [f"top1/{s}" for s in STAGES],
                               plots.get("readout"), "Readout top-1 per stage and method")
    else:
        md += ["No readout runs found.", ""]
    md += render_knn(rows["readout"])

    md += ["## Pretraining, measured", ""]
    pre = rows["pretrain"]
    if pre:
        metrics = _metric_names(pre)
        header = ["method", "recipe"] + [
            m.replace("final_loss/", "final loss ").replace("wall_time_s", "wall time s")
            for m in metrics] + ["n", "status"]
        body = [[r.label, str(r.protocol.get("recipe", "-"))]
                + [_cell(r, m, 1 if m == "wall_time_s" else 4) for m in metrics]
                + [_n_cell(r), r.status()] for r in pre]
        md += [_md_table(header, body), ""]
        fields = [k for k in PROTOCOL_FIELDS["pretrain"] if k != "recipe"]
        md += ["Their protocols:", "", _md_table(
            ["method", "recipe"] + [_HEADERS.get(k, k) for k in fields] + ["seeds"],
            [[r.label, str(r.protocol.get("recipe", "-"))]
             + [str(r.protocol.get(k, "-")) for k in fields] + [r.seeds() or "-"]
             for r in pre]), ""]
        if plots.get("pretrain"):
            md += [f"![Per-unit loss curves per method]({plots['pretrain']})",
                   f"Plot: `{plots['pretrain']}`", ""]
        if plots.get("knn_curves"):
            md += [f"![kNN top-1 during pretraining per rule]({plots['knn_curves']})",
                   f"Plot: `{plots['knn_curves']}` (kNN monitor, k 20 and 200, per stage, "
                   "from the random initial encoder at step 0, against the random-init kNN "
                   "readout on the same data)", ""]
    else:
        md += ["No pretraining runs found.", ""]

    md += render_comparisons(comps, reference)

    md += ["## Missing or unfinished runs", ""]
    if not_done:
        body = [[r.kind, r.label, str(r.protocol.get("config") or r.protocol.get("recipe")
                                      or "-"), str(r.seed if r.seed is not None else "-"),
                 r.status, r.path, r.note or "-"] for r in sorted(
                     not_done, key=lambda r: (r.kind, r.label, r.path))]
        md += [_md_table(["kind", "method", "config", "seed", "status", "path", "note"], body), ""]
    else:
        md += ["None.", ""]

    md += ["## Plots", ""]
    if plots:
        md += [f"- `{p}`" for p in plots.values()]
    else:
        md.append("No plots (no finished runs).")
    md.append("")

    md += ["## Paper's reported numbers (not measured here)", "",
           f"From {PAPER_CITATION}; copied in loco_det/paper_reference.yaml. These are **not** "
           "results of this suite and are never mixed into the measured tables above; they "
           "were obtained at full ImageNet/COCO/Cityscapes scale, one run each.", ""]
    md += render_paper_differences()
    for table in PAPER_TABLES:
        md += [f"### {table['title']} (paper)", "", _md_table(table["header"], table["rows"]), ""]
    return "\n".join(md)


def render_paper_differences():
    return ["### The paper's differences (not measured here)", "",
            "The differences as published, to read beside the measured comparisons above (no "
            "interval is given in the paper).", "",
            _md_table(["table", "pretraining", "difference", "benchmark", "metric", "paper"],
                      paper_differences()), ""]


def render_knn(readout_rows):
    """Weighted kNN top-1 per stage (knn.json): one table per k, one row per readout row and
    kNN protocol."""
    entries = []
    for row in readout_rows:
        groups = {}
        for run in row.runs:
            if "knn" in run.protocol:
                groups.setdefault(run.protocol["knn"], []).append(run)
        for proto, runs in groups.items():
            entries.append((row, proto, Row("readout", row.label, row.protocol, runs=runs)))
    if not entries:
        return []
    md = ["## kNN readout, measured (top-1 %, frozen encoder, per stage)", "",
          "Weighted kNN (InstDisc / DINO): L2-normalised pooled features, k nearest training "
          "images vote with exp(cos / T).", ""]
    for k in KNN_KS:
        header = ["method", "pretraining", "arch", "kNN protocol"] + list(STAGES) + [
            "n", "seeds"]
        body = [[row.label, str(row.protocol.get("pretraining", "-")),
                 str(row.protocol.get("arch", "-")), proto]
                + [_cell(sub, f"knn/k{k}/{s}") for s in STAGES]
                + [str(len(sub.runs)), sub.seeds() or "-"] for row, proto, sub in entries]
        md += [f"### k = {k}", "", _md_table(header, body), ""]
    return md


def render_other_tasks(det_rows):
    """VOC detection and semantic-segmentation rows, each benchmark in its own section."""
    md = []
    for bench, (title, note, metrics) in OTHER_TASKS.items():
        brows = [r for r in det_rows if r.protocol.get("benchmark") == bench]
        if brows:
            md += [f"## {title}", "", note, ""] + _measured_groups(brows, metrics)
    return md


CSV_FIELDS = ["section", "method", "metric", "mean", "std", "n", "seeds", "repeats", "status",
              "n_missing", "n_unfinished", "fingerprint"] + sorted(
                  {f for fs in PROTOCOL_FIELDS.values() for f in fs}) + ["paths"]
COMPARISON_FIELDS = ["kind", "dataset", "protocol", "metric", "method", "vs", "role", "diff", "ci_low",
                     "ci_high", "halfwidth", "test", "df", "n_a", "n_b", "verdict"]


def render_csv(rows):
    """One line per (row, metric) with full-precision numbers; missing rows have empty mean."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for kind in ("pretrain", "readout", "detection"):
        krows = rows[kind]
        metrics = _metric_names(krows) or (["APbb", "APmk"] if kind == "detection" else
                                           [f"top1/{s}" for s in STAGES] if kind == "readout"
                                           else ["final_loss/unit1"])
        for row in krows:
            for m in metrics:
                stat = row.stat(m)
                if row.runs and stat is None:
                    continue
                rec = {"section": f"measured_{kind}", "method": row.label, "metric": m,
                       "status": row.status(), "seeds": row.seeds(),
                       "repeats": ";".join(f"{k}x{v}" for k, v in row.repeats().items()),
                       "fingerprint": ";".join(sorted({r.fingerprint for r in row.runs})),
                       "n_missing": sum(o.status == "missing" for o in row.others),
                       "n_unfinished": sum(o.status == "unfinished" for o in row.others),
                       "paths": ";".join(r.path for r in row.runs + row.others)}
                if stat is not None:
                    rec.update(mean=repr(stat[0]), std="" if stat[1] is None else repr(stat[1]),
                               n=stat[2])
                else:
                    rec.update(mean="", std="", n=0)
                rec.update({k: row.protocol.get(k, "") for k in PROTOCOL_FIELDS[kind]})
                w.writerow(rec)
    return buf.getvalue()


def render_comparisons_csv(comps):
    """comparisons.csv: one line per comparison with full-precision numbers."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COMPARISON_FIELDS, lineterminator="\n")
    w.writeheader()
    for item in comps:
        c = item["comparison"]
        w.writerow({"kind": item["kind"], "dataset": item["dataset"], "protocol": item["group"],
                    "metric": item["metric"],
                    "method": item["method"], "vs": item["vs"], "role": item["role"],
                    "diff": repr(c.diff), "ci_low": "" if c.low is None else repr(c.low),
                    "ci_high": "" if c.high is None else repr(c.high),
                    "halfwidth": "" if c.halfwidth is None else repr(c.halfwidth),
                    "test": c.test, "df": "" if c.df is None else repr(float(c.df)),
                    "n_a": c.n_a, "n_b": c.n_b, "verdict": c.verdict})
    return buf.getvalue()


def render_paper_csv():
    """The paper's rows, in their own file: report.csv holds measured numbers only."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "table", "row", "column", "value"])
    for table in PAPER_TABLES:
        keys = table.get("keys", 2 if table["header"][0] == "pretraining" else 1)
        for row in table["rows"]:
            name = " ".join(c for c in row[:keys] if c != "-")
            for col, value in zip(table["header"][keys:], row[keys:]):
                w.writerow(["paper (not measured here)", table["title"], name, col, value])
    return buf.getvalue()


