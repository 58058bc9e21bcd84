"""Building rows: finished runs grouped by fingerprint and protocol (never by label), with
missing and unfinished runs matched to their row."""
import json
from dataclasses import dataclass, field

from .. import stats
from .runs import PROTOCOL_FIELDS, _rule_needs

# decoder, and what the baseline protocol prescribes for random init); the others must match.
COMPARE_FREE = {"pretrain": ("decoder",), "readout": ("pretraining", "decoder"),
                "detection": ("weights", "decoder", "backbone")}
# The metrics compared between methods, per kind (higher is better).


@dataclass
class Row:
    """Runs of one label under one protocol: the unit that gets a mean +- std."""
    kind: str
    label: str
    protocol: dict
    runs: list = field(default_factory=list)          # finished runs
    others: list = field(default_factory=list)        # missing / unfinished runs matched here

    def by_seed(self):
        """{seed key: [runs]} of the finished runs, in seed order."""
        out = {}
        for r in sorted(self.runs, key=lambda r: str(r.seed)):
            out.setdefault(r.seed_key(), []).append(r)
        return out

    def per_seed(self, metric):
        """{seed key: value}; repeats of one seed are averaged (they are one repetition)."""
        out = {}
        for key, runs in self.by_seed().items():
            vals = [r.metrics[metric] for r in runs if metric in r.metrics]
            if vals:
                out[key] = stats.mean_std(vals)[0]
        return out

    def values(self, metric):
        return list(self.per_seed(metric).values())

    def stat(self, metric):
        """(mean, sample std or None, n distinct seeds); None when no run has the metric."""
        vals = self.values(metric)
        return stats.mean_std(vals) if vals else None

    def repeats(self):
        """{seed: count} of seeds that were run more than once."""
        return {str(runs[0].seed): len(runs) for runs in self.by_seed().values()
                if len(runs) > 1}

    def seeds(self):
        """Distinct seeds, comma-separated."""
        return ",".join(str(runs[0].seed) for runs in self.by_seed().values())

    def status(self):
        if not self.runs:
            kinds = sorted({o.status for o in self.others})
            return "/".join(kinds) if kinds else "missing"
        counts = {}
        for o in self.others:
            counts[o.status] = counts.get(o.status, 0) + 1
        parts = [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))] if counts else ["ok"]
        parts += [f"repeat: seed {seed} run {n}x (counted once)"
                  for seed, n in self.repeats().items()]
        parts += sorted({r.note for r in self.runs if r.note})
        return "; ".join(parts)



def _protocol_key(run):
    return tuple((k, str(run.protocol.get(k, "?"))) for k in PROTOCOL_FIELDS[run.kind])


def _display_label(run):
    """A run of a label-trained rule pretrained by loco_det, labelled by its method's name
    (`supervised`), is labelled apart from published supervised weights
    (detection.supervised_weights, 'supervised (published weights)')."""
    if run.label == run.method and run.status == "finished" and _takes_labels(run.method) and (
            run.kind in ("pretrain", "readout") or run.protocol.get("weights") not in (
                "published", "?", "random init")):
        return f"{run.label} (trained here)"
    return run.label


def _takes_labels(method):
    return bool(method) and _rule_needs(method).takes_labels


def build_rows(runs):
    """Rows per kind: finished runs grouped by (fingerprint, protocol), never by label; missing
    and unfinished runs are counted in the row of their label and config when exactly one such
    row exists, else they get a row of their own (with no numbers). Labels that collide within
    one comparison group get a suffix naming what differs."""
    rows = {}
    for run in runs:
        if run.status == "finished":
            key = (run.kind, run.fingerprint or ("label", run.label), _protocol_key(run))
            row = rows.setdefault(key, Row(run.kind, _display_label(run), dict(run.protocol)))
            row.runs.append(run)
    for row in rows.values():   # one label per row: the most frequent of its runs
        labels = [_display_label(r) for r in row.runs]
        row.label = max(sorted(set(labels)), key=labels.count)
    by_match = {}
    for row in rows.values():
        by_match.setdefault(row.runs[0].match_key(), []).append(row)
    for run in runs:
        if run.status == "finished":
            continue
        candidates = by_match.get(run.match_key(), [])
        if len(candidates) == 1:
            candidates[0].others.append(run)
            continue
        key = (run.kind, run.label, _protocol_key(run), run.status, run.path)
        rows[key] = Row(run.kind, run.label, dict(run.protocol), others=[run])
    out = {kind: [] for kind in PROTOCOL_FIELDS}
    for row in rows.values():
        out[row.kind].append(row)
    for kind in out:
        _suffix_colliding_labels(out[kind])
        # config first, so a missing run sits beside its config's measured rows
        out[kind].sort(key=lambda r: (str(r.protocol.get("config", "")), tuple(
            str(r.protocol.get(k, "")) for k in PROTOCOL_FIELDS[kind]), r.label))
    return out


def group_key(row):
    """Rows that are compared with each other (and whose labels must not collide): the same
    protocol except the fields a method or baseline may change (COMPARE_FREE)."""
    free = COMPARE_FREE.get(row.kind, ())
    return (row.kind,) + tuple(str(row.protocol.get(k, "")) for k in PROTOCOL_FIELDS[row.kind]
                               if k not in free)


def _fmt_value(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _suffix_colliding_labels(rows, max_keys=3):
    """`e2e` and `e2e` in one comparison group become `e2e [MODEL.DECODER.CONV_BLOCKS=0]` and
    `e2e [MODEL.DECODER.CONV_BLOCKS=1]`: the settings whose values differ between them."""
    groups = {}
    for row in rows:
        if row.runs:
            groups.setdefault((group_key(row), row.label), []).append(row)
    for same in groups.values():
        if len(same) < 2:
            continue
        idents = [row.runs[0].identity for row in same]
        keys = sorted(set().union(*idents))
        differ = [k for k in keys if len({_fmt_value(i.get(k, "-")) for i in idents}) > 1]
        named = [k for k in differ if k != "weights"] or differ
        for row, ident in zip(same, idents):
            if named:
                shown = ", ".join(f"{k}={_fmt_value(ident.get(k, '-'))}"
                                  for k in named[:max_keys])
                more = f", +{len(named) - max_keys} more" if len(named) > max_keys else ""
                row.label = f"{row.label} [{shown}{more}]"
            else:
                row.label = f"{row.label} [run {row.runs[0].fingerprint[:8]}]"


