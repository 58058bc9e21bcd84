"""Plots: per-unit pretraining loss curves, readout top-1 per stage, detection AP per
benchmark (PNG files under the report's plots/)."""
import os

from ..records import STAGES
from ..utils import atomic_write
from .render import OTHER_TASKS
from .rows import group_key

PLOTS = {"pretrain": "plots/pretrain_loss.png", "readout": "plots/readout_top1.png",
         "detection": "plots/detection_ap.png", "knn_curves": "plots/knn_during_pretraining.png"}
# the kNN monitor's neighbour counts that are plotted (one row of stage panels each); every
# panel also shows the random-init kNN readout of the same data set, k and stage
KNN_KS = ("k20", "k200")


def _save(fig, path):
    """savefig to a temp file then rename: a reader never sees half a PNG."""
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def _subplots(plt, n):
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.6 * nrows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _by_protocol(rows):
    """One panel per comparison group (rows compared with each other)."""
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault(group_key(row), []).append(row)
    return groups


def _bars(ax, xs, stats_list, width, **kw):
    """Bars of means. Error bars (± sample std) only where n >= 2; n = 1 bars are hatched and
    marked "1 run": a zero-width error bar would read as certainty."""
    heights = [s[0] if s else 0 for s in stats_list]
    bars = ax.bar(xs, heights, width, **kw)
    for bar, x, st in zip(bars, xs, stats_list):
        if not st:
            continue
        if st[2] >= 2:
            ax.errorbar([x], [st[0]], yerr=[st[1]], fmt="none", ecolor="black", capsize=2,
                        lw=0.8)
        else:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
            ax.annotate("1 run", (x, st[0]), ha="center", va="bottom", fontsize=7,
                        rotation=90, xytext=(0, 1), textcoords="offset points")
    return bars


def _legend_below(ax, ncol):
    """Legend under the axes, never over the bars or curves it explains."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol,
              frameon=False)


def _knn_curves(plt, pre, readout_rows, out_dir):
    """kNN top-1 on the monitor's data against pretraining step: per data set, one row of
    panels per k and one panel per stage, one line per seed of each rule (a run's first point,
    step 0, is its random initial encoder); in every panel, as a horizontal line, the mean of
    the random-init kNN readouts on the same data set. Whether a rule learns, and at which
    stage, shows from one seed."""
    by_data = {}
    for row in pre:
        by_data.setdefault(row.protocol.get("dataset", "?"), []).append(row)
    panels = [(d, k) for d in by_data for k in KNN_KS]
    fig, axes = plt.subplots(len(panels), len(STAGES), figsize=(4.0 * len(STAGES),
                             3.4 * len(panels)), squeeze=False)
    handles = {}
    for line, (dataset, k) in zip(axes, panels):
        for ax, stage in zip(line, STAGES):
            curve = f"{k}/{stage}"
            for i, row in enumerate(by_data[dataset]):
                for j, run in enumerate(sorted(row.runs, key=lambda r: str(r.seed))):
                    xs, ys = run.knn_curves.get(curve, ([], []))
                    if not xs:
                        continue
                    h, = ax.plot(xs, ys, color=f"C{i}", alpha=1.0 if j == 0 else 0.5, lw=1.2,
                                 marker="o" if len(xs) < 20 else None, ms=3)
                    handles.setdefault(f"{row.label} (n={len(row.runs)})", h)
            randoms = [r.stat(f"knn/{curve}") for r in readout_rows if r.runs
                       and r.protocol.get("dataset") == dataset
                       and r.protocol.get("pretraining") == "random init"]
            for st in filter(None, randoms):
                h = ax.axhline(st[0], color="gray", ls="--", lw=1)
                handles.setdefault(f"random init, kNN readout (mean, n={st[2]})", h)
            ax.set_title(f"{dataset}: {stage}, k={k[1:]}", fontsize=9)
            ax.set_xlabel("pretraining step", fontsize=8)
            ax.set_ylabel("kNN top-1 %", fontsize=8)
    fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=8,
               ncol=min(len(handles), 4), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("kNN monitor during pretraining (RUN.KNN_PERIOD), per rule and seed; step 0 is "
                 "the random initial encoder\n(the monitor's data and protocol may differ from "
                 "the kNN readout's)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, os.path.join(out_dir, PLOTS["knn_curves"]))
    plt.close(fig)


def make_plots(rows, out_dir):
    """Write the PNGs that have data; returns {kind: relative path} of those written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    pre = [r for r in rows["pretrain"] if any(run.curves for run in r.runs)]
    if pre:
        fig, axes = _subplots(plt, len(pre))
        for ax, row in zip(axes, pre):
            for i, run in enumerate(sorted(row.runs, key=lambda r: str(r.seed))):
                for j, (unit, (xs, ys)) in enumerate(sorted(run.curves.items())):
                    ax.plot(xs, ys, color=f"C{j}", alpha=1.0 if i == 0 else 0.5, lw=1.2,
                            marker="o" if len(xs) < 20 else None, ms=3,   # short runs: visible
                            label=unit if i == 0 else None)
            ax.set_title(f"{row.label} ({row.protocol.get('recipe')}, n={len(row.runs)})",
                         fontsize=10)
            ax.set_xlabel("step", fontsize=9)
            ax.set_ylabel("loss", fontsize=9)
            _legend_below(ax, ncol=4)
        fig.suptitle("Per-unit pretraining loss per method")
        _save(fig, os.path.join(out_dir, PLOTS["pretrain"]))
        plt.close(fig)
        written["pretrain"] = PLOTS["pretrain"]

    pre = [r for r in rows["pretrain"] if any(run.knn_curves for run in r.runs)]
    if pre:
        _knn_curves(plt, pre, rows["readout"], out_dir)
        written["knn_curves"] = PLOTS["knn_curves"]

    groups = _by_protocol(rows["readout"])
    if groups:
        fig, axes = _subplots(plt, len(groups))
        for ax, (proto, grows) in zip(axes, groups.items()):
            width = 0.8 / len(grows)
            for i, row in enumerate(grows):
                values = [row.stat(f"top1/{s}") for s in STAGES]
                xs = [k + i * width for k in range(len(STAGES))]
                n = len(row.by_seed())
                _bars(ax, xs, values, width, color=f"C{i}",
                      label=f"{row.label} ({row.protocol.get('pretraining')}, n={n})")
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(STAGES))], list(STAGES),
                          fontsize=9)
            ax.set_ylabel("top-1 %", fontsize=9)
            p = grows[0].protocol
            ax.set_title(f"{p.get('arch')}, {p.get('readout')} readout:\n"
                         f"{p.get('readout_epochs')} epochs, lr {p.get('lr')}, "
                         f"{p.get('image_size')} px", fontsize=10)
            _legend_below(ax, ncol=1)
        fig.suptitle("Linear readout top-1 per stage and method\n(error bars: ± std over "
                     "n >= 2 seeds; hatched: a single run, no error bar)", fontsize=11)
        _save(fig, os.path.join(out_dir, PLOTS["readout"]))
        plt.close(fig)
        written["readout"] = PLOTS["readout"]

    groups = _by_protocol([r for r in rows["detection"]
                           if r.protocol.get("benchmark") not in OTHER_TASKS])
    if groups:
        fig, axes = _subplots(plt, len(groups))
        for ax, (proto, grows) in zip(axes, groups.items()):
            xs = list(range(len(grows)))
            for j, metric in enumerate(("APbb", "APmk")):
                _bars(ax, [x + j * 0.4 for x in xs], [r.stat(metric) for r in grows], 0.4,
                      color=f"C{j}", label=metric)
            ax.set_xticks([x + 0.2 for x in xs],
                          [f"{r.label}\nn={len(r.by_seed())}" for r in grows], fontsize=8,
                          rotation=30 if len(grows) > 3 else 0,
                          ha="right" if len(grows) > 3 else "center")
            ax.set_ylabel("AP %", fontsize=9)
            p = grows[0].protocol
            ax.set_title(f"{p.get('benchmark')}: {p.get('config')}\n{p.get('schedule')}, "
                         f"batch {p.get('global_batch')}", fontsize=10)
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.suptitle("Mask R-CNN APbb / APmk per method and benchmark\n(error bars: ± std "
                     "over n >= 2 seeds; hatched: a single run, no error bar)", fontsize=11)
        _save(fig, os.path.join(out_dir, PLOTS["detection"]))
        plt.close(fig)
        written["detection"] = PLOTS["detection"]
    return written


