"""What the runner tells the user and the report: the dry run's job list, the overall progress
line after each job, and the manifest (benchmark.json) of the runs the grid expects."""
import os
import shlex
import sys
import time

from ..records import MANIFEST
from ..utils import write_json
from .jobs import JOB_STAGES


def write_manifest(out, grid_path, profile, sets, jobs, missing):
    """benchmark.json: what the grid expects, so the report lists runs that never started.
    Outputs are relative to the manifest's folder."""
    entries = [{"kind": job.stage, "id": job.id, "label": job.label, "config": job.config,
                "seed": job.seed, "output": job.id}
               for job in jobs if job.stage in ("pretrain", "readout", "detection")]
    entries += missing
    write_json(os.path.join(out, MANIFEST), {
        "kind": "benchmark_manifest", "grid": os.path.abspath(grid_path), "profile": profile,
        "set": list(sets), "jobs": entries})


def fmt_time(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def res_text(res):
    gpus = int(res["gpus_per_node"])
    where = f"{res['nodes']} node(s) x {gpus} GPU(s)" if gpus else "CPU"
    return f"{where}, {res['cpus_per_task']} CPUs, {res['time_min']} min"


def dry_run(jobs, notes, missing, notices=(), blocked=None):
    """Print every command (with --resume where a checkpoint exists) and what would be skipped;
    `blocked` ({job id: input}) marks jobs whose input is missing."""
    w = sys.stdout.write
    blocked = blocked or {}
    for i, job in enumerate(jobs, 1):
        state = "skip: results exist" if job.is_done() else (
            f"cannot run: {blocked[job.id]} missing" if job.id in blocked else
            "resume" if job.resuming() else "run")
        w(f"# [{i}/{len(jobs)}] {job.stage} {job.id} ({state}; {res_text(job.resources)})\n")
        w(shlex.join(job.command()) + "\n")
    for note in notes:
        w(f"# note: {note} ({len(missing)} runs)\n")
    for notice in notices:
        w(f"# note: {notice}\n")
    counts = {s: sum(j.stage == s for j in jobs) for s in JOB_STAGES}
    w(f"# {len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "\n")


def progress_line(jobs, status, took_s, workers, start_all):
    """"K/N settled, M elapsed, ~T left": the grid's overall progress after a job ends. What is
    left is estimated per stage from the jobs of that stage that ran here (a stage with none
    yet is left out and named), divided by the jobs run at a time."""
    seen = {}
    for job in jobs:
        if job.id in took_s and status.get(job.id) == "done":
            seen.setdefault(job.stage, []).append(took_s[job.id])
    left, unknown = 0.0, set()
    for job in jobs:
        if job.id in status:
            continue
        if job.stage in seen:
            left += sum(seen[job.stage]) / len(seen[job.stage])
        elif job.stage != "report":
            unknown.add(job.stage)
    text = (f"{len(status)}/{len(jobs)} settled, {fmt_time(time.time() - start_all)} elapsed, "
            f"~{fmt_time(left / workers)} left")
    if unknown:
        text += " + " + ", ".join(s for s in JOB_STAGES if s in unknown) + " (none timed yet)"
    return text
