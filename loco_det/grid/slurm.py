"""The SLURM launcher: every unfinished job is submitted through submitit's SlurmExecutor
with the resources the grid requests and afterok dependencies on its unfinished dependencies
(the report: afterany). A submission that fails cancels what was queued and removes what it
wrote. Runtime placeholders in commands ($MASTER_ADDR, $NODE_RANK, $JOB_ID) are filled in on
the node."""
import os
import shutil
import subprocess

from ..utils import LocoError, write_json
from . import jobs as _jobs
from .jobs import one_line, rel
from .progress import res_text


class SlurmCommand:
    """What submitit pickles and runs on each node of a job's allocation: fills in the runtime
    placeholders, decides --resume there (a requeued job resumes), and runs the command."""

    def __init__(self, job):
        self.job = job

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        values = {"$MASTER_ADDR": env.hostnames[0], "$NODE_RANK": str(env.global_rank),
                  "$JOB_ID": str(env.job_id)}
        argv = self.job.command()
        for key, value in values.items():
            argv = [a.replace(key, value) for a in argv]
        subprocess.run(argv, cwd=_jobs.REPO, env=dict(os.environ, **self.job.env), check=True)


def run_slurm(jobs, notes, out, slurm_options):
    """Submit every job that is not finished, each with afterok dependencies on its unfinished
    dependencies; the report job runs after all of them (afterany)."""
    if shutil.which("sbatch") is None:
        raise LocoError("--launcher slurm needs SLURM (sbatch not found on PATH)")
    import submitit

    for note in notes:
        print(f"note: {note}")
    submitted = {}
    # A submission that fails leaves nothing behind: jobs already queued are cancelled, and
    # what this call wrote (submitit's files below OUT/slurm/) is removed.
    before = _existing(out)
    try:
        _submit_all(jobs, out, slurm_options, submitted, submitit)
    except BaseException as e:
        cancelled = _cancel(submitted)
        _remove_new(out, before)
        if isinstance(e, Exception):
            raise LocoError(f"SLURM submission failed: {one_line(e)}; {cancelled}nothing was "
                            "written") from None
        raise
    write_json(os.path.join(out, "slurm_jobs.json"), submitted)
    print(f"summary: {len(submitted)} jobs submitted, {len(jobs) - len(submitted)} skipped; "
          f"report after all: {rel(os.path.join(out, 'report.md'))}")
    return 0


def _existing(out):
    """(whether `out` exists, the entries of OUT/slurm or None): what `_remove_new` keeps."""
    folder = os.path.join(out, "slurm")
    return os.path.isdir(out), (set(os.listdir(folder)) if os.path.isdir(folder) else None)


def _remove_new(out, before):
    """Remove what a failed submission wrote: submitit's files and job folders below OUT/slurm
    (new entries only: earlier jobs' folders stay), and OUT/slurm and OUT if they are new."""
    out_existed, entries = before
    folder = os.path.join(out, "slurm")
    if not out_existed:
        shutil.rmtree(out, ignore_errors=True)
    elif entries is None:
        shutil.rmtree(folder, ignore_errors=True)
    elif os.path.isdir(folder):
        for name in set(os.listdir(folder)) - entries:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def _cancel(submitted):
    """scancel the jobs already queued; what the message says about them."""
    if not submitted:
        return ""
    ids = list(submitted.values())
    try:
        rc = subprocess.run(["scancel", *ids], capture_output=True).returncode
    except OSError:
        rc = None
    if rc == 0:
        return f"the {len(ids)} job(s) already queued were cancelled ({', '.join(ids)}); "
    return f"cancel the {len(ids)} job(s) already queued: scancel {' '.join(ids)}; "


def _submit_all(jobs, out, slurm_options, submitted, submitit):
    options = {k: v for k, v in (slurm_options or {}).items() if v is not None}
    additional = dict(options.pop("additional_parameters", None) or {})
    for job in jobs:
        if job.stage != "report" and job.is_done():
            print(f"skipped  {job.id}  (results exist: {job.done_file})")
            continue
        deps = [submitted[d] for d in job.deps if d in submitted]
        res = job.resources
        # SlurmExecutor directly: AutoExecutor's plugin discovery needs pkg_resources.
        cpus = int(res["cpus_per_task"])
        # srun does not inherit --cpus-per-task from sbatch on Slurm 22.05-23.02: without it
        # the task (torchrun, its ranks and their loader workers) would get one CPU.
        params = dict(options, job_name=f"loco_det:{job.id}", nodes=int(res["nodes"]),
                      ntasks_per_node=1, cpus_per_task=cpus, time=int(res["time_min"]),
                      srun_args=[*options.get("srun_args", []), f"--cpus-per-task={cpus}"])
        if int(res["gpus_per_node"]):
            params["gpus_per_node"] = int(res["gpus_per_node"])
        if res.get("mem_gb"):
            params["mem"] = f"{res['mem_gb']}GB"
        extra = dict(additional)
        if deps:
            kind = "afterany" if job.stage == "report" else "afterok"
            params["dependency"] = f"{kind}:" + ":".join(deps)
            extra["kill-on-invalid-dep"] = "yes"
        if extra:
            params["additional_parameters"] = extra
        executor = submitit.SlurmExecutor(folder=os.path.join(out, "slurm", "%j"))
        executor.update_parameters(**params)
        submitted[job.id] = str(executor.submit(SlurmCommand(job)).job_id)
        print(f"submitted {job.id}  (job {submitted[job.id]}; {res_text(res)}"
              + (f"; after {', '.join(deps)}" if deps else "") + ")")
