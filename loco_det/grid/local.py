"""The local launcher: jobs run here in dependency order, up to --jobs at a time, each as a
subprocess in the repository root with its output streamed to the terminal (unless quiet) and to
OUT/logs/. A job whose results exist is skipped, one with a checkpoint resumes; a failed job's
dependants are blocked and the others go on; the report is written at the end in any case."""
import os
import shlex
import subprocess
import sys
import time

from ..utils import LocoError, die_with_parent
from . import jobs as _jobs
from .jobs import rel, repo_path
from .progress import fmt_time, progress_line


def _log_path(out, job):
    return os.path.join(out, "logs", job.id.replace("/", "__") + ".log")


def _run_command(job, out, quiet, live=None, extra_env=None):
    """Run one job, streaming its output to the terminal (unless quiet) and to its log. `live`
    (a set) holds the running process, so that the caller can stop it from another thread;
    `extra_env` goes under the job's own environment."""
    log = _log_path(out, job)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, **(extra_env or {}), **job.env, PYTHONUNBUFFERED="1")
    try:   # never append through a link planted where the log goes
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise LocoError(f"cannot open the job log {log}: "
                        + ("it is a symbolic link; refusing to write through it"
                           if os.path.islink(log) else (e.strerror or str(e)))) from None
    with os.fdopen(fd, "ab") as f:
        f.write(f"$ {shlex.join(job.command())}\n".encode())
        f.flush()
        proc = subprocess.Popen(job.command(), cwd=_jobs.REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        if live is not None:
            live.add(proc)
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                f.write(chunk)
                if not quiet:
                    if hasattr(sys.stdout, "buffer"):
                        sys.stdout.buffer.write(chunk)
                    else:
                        sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
            return proc.wait(), log
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if live is not None:
                live.discard(proc)


def _start_check(job, status, n_jobs):
    """Why `job` cannot start now ("skipped"/"blocked"/"failed" with a reason), "wait" while a
    dependency is unfinished, or None when it can run."""
    if job.is_done():
        return "skipped", f"results exist: {job.done_file}"
    if job.stage == "report":   # written in any case, after every other job
        return ("wait", "") if len(status) < n_jobs - 1 else None
    if any(d not in status for d in job.deps):
        return "wait", ""
    bad = [d for d in job.deps if status[d] in ("failed", "blocked")]
    if bad:
        return "blocked", f"dependency failed: {bad[0]}"
    missing = [p for p in job.requires if not os.path.exists(repo_path(p))]
    if missing:
        return "failed", f"input not found: {missing[0]}"
    if int(job.resources["nodes"]) > 1:
        return "failed", f"needs {job.resources['nodes']} nodes: use --launcher slurm"
    return None


def local_env(workers, environ=None):
    """Environment additions for `workers` concurrent local jobs: each job gets an equal share of
    the CPUs as its thread count (OMP_NUM_THREADS), unless the caller set one; PyTorch's default
    (one thread per core in every process) would oversubscribe the machine."""
    environ = os.environ if environ is None else environ
    if workers <= 1 or "OMP_NUM_THREADS" in environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


class GpuSlices:
    """CUDA_VISIBLE_DEVICES of concurrent local jobs (--jobs N > 1 on a machine with GPUs):
    each job gets `gpus_per_node` GPUs no running job holds, a CPU job (0) gets none, so that
    no two jobs share cuda:0. A job waits until enough GPUs are free. Inactive (no variable set)
    with one job at a time or no GPU: that job sees every GPU, as before."""

    def __init__(self, gpus, active):
        self.all, self.free = list(gpus), list(gpus)
        self.active = bool(active and self.all)

    @classmethod
    def for_machine(cls, workers, environ=None):
        environ = os.environ if environ is None else environ
        if workers <= 1:
            return cls([], False)
        if "CUDA_VISIBLE_DEVICES" in environ:
            gpus = [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
        else:
            import torch  # only here: a dry run or a single worker stays fast

            gpus = [str(i) for i in range(torch.cuda.device_count())]
        return cls(gpus, True)

    def take(self, job):
        """(environment additions, None) when the job can start now; (None, None) while it
        must wait; (None, reason) when this machine can never run it."""
        if not self.active:
            return {}, None
        n = int(job.resources["gpus_per_node"])
        if n > len(self.all):
            return None, f"needs {n} GPUs, this machine has {len(self.all)}"
        if n > len(self.free):
            return None, None
        ids, self.free = self.free[:n], self.free[n:]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}, None

    def give(self, env):
        if self.active and env.get("CUDA_VISIBLE_DEVICES"):
            self.free += env["CUDA_VISIBLE_DEVICES"].split(",")


def run_local(jobs, notes, out, quiet=False, workers=1):
    """Run jobs in dependency order, up to `workers` at a time (each started as soon as its
    dependencies are done, in grid order); returns the exit status (0 only when every job is
    done or skipped). With several workers the jobs' output goes to their logs only."""
    import concurrent.futures as cf

    if workers < 1:
        raise LocoError(f"--jobs must be at least 1, got {workers}")
    status = {}   # id -> done | skipped | failed | blocked
    failed_logs = {}
    start_all = time.time()
    n = len(jobs)
    width = len(str(n))
    tags = {job.id: f"[{i:>{width}}/{n}]" for i, job in enumerate(jobs, 1)}
    extra_env = local_env(workers)
    gpus = GpuSlices.for_machine(workers)
    quiet = quiet or workers > 1
    for note in notes:
        print(f"note: {note}")
    if workers > 1:
        print(f"note: {workers} jobs at a time"
              + (f", OMP_NUM_THREADS={extra_env['OMP_NUM_THREADS']} each" if extra_env else "")
              + (f", GPUs {','.join(gpus.all)} shared out by gpus_per_node (CPU jobs get none)"
                 if gpus.active else "")
              + f"; their output goes to {rel(os.path.join(out, 'logs'))}/", flush=True)
    live = set()
    running = {}   # future -> (job, start time)
    took_s = {}    # job id -> seconds it ran (for the estimate of what is left)
    pending = list(jobs)

    def run(job, devices):
        if job.stage == "report":
            return _write_report(out), None
        try:
            return _run_command(job, out, quiet, live, dict(extra_env, **devices))
        except LocoError as e:
            print(f"error: {job.id}: {e}", flush=True)
            return 1, None
        except OSError as e:
            print(f"error: {job.id}: cannot start {job.command()[0]}: {e.strerror}", flush=True)
            return 127, None

    pool = cf.ThreadPoolExecutor(max_workers=workers)
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                check = _start_check(job, status, n)
                if check is not None and check[0] == "wait":
                    continue
                devices = {}
                if check is None and job.stage != "report":
                    devices, never = gpus.take(job)
                    if devices is None and never is None:
                        continue   # waits for GPUs that running jobs hold
                    if never is not None:
                        check = ("failed", never)
                pending.remove(job)
                if check is not None:
                    status[job.id] = check[0]
                    print(f"{tags[job.id]} {check[0]:<8} {job.id}  ({check[1]})", flush=True)
                    continue
                what = "resuming" if job.resuming() else "running"
                print(f"{tags[job.id]} {what} {job.id}: {shlex.join(job.command())}",
                      flush=True)
                running[pool.submit(run, job, devices)] = (job, time.time(), devices)
            if not running:
                if pending:   # cannot happen with dependencies on earlier jobs; never spin
                    raise LocoError(f"grid: job {pending[0].id} waits for a job that never runs")
                break
            finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job, t0, devices = running.pop(fut)
                gpus.give(devices)
                rc, log = fut.result()
                took = fmt_time(time.time() - t0)
                took_s[job.id] = time.time() - t0
                if rc == 0:
                    status[job.id] = "done"
                    print(f"{tags[job.id]} done     {job.id}  ({took}; "
                          f"{progress_line(jobs, status, took_s, workers, start_all)})",
                          flush=True)
                else:
                    status[job.id] = "failed"
                    failed_logs[job.id] = log
                    print(f"{tags[job.id]} failed   {job.id}  (exit {rc}, {took}"
                          + (f"; log: {rel(log)}" if log else "") + ")", flush=True)
    except BaseException:
        for proc in list(live):   # Ctrl-C / SIGTERM: stop every running job, then report
            proc.terminate()
        for proc in list(live):
            proc.wait()
        raise
    finally:
        pool.shutdown(wait=True)
    counts = {s: sum(v == s for v in status.values())
              for s in ("done", "skipped", "failed", "blocked")}
    print(f"summary: {n} jobs in {fmt_time(time.time() - start_all)}: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    for job_id, log in failed_logs.items():
        print(f"  failed: {job_id}" + (f" (log: {rel(log)})" if log else ""))
    if status.get("report") == "done":
        print(f"report: {rel(os.path.join(out, 'report.md'))}")
    return 1 if counts["failed"] or counts["blocked"] else 0


def _write_report(out):
    from ..report import write_report

    try:
        write_report([out], out)
    except LocoError as e:
        print(f"error: report: {e}", flush=True)
        return 1
    return 0
