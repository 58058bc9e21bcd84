"""The grid runner's overall progress line: settled jobs, elapsed time and an estimate of what
is left from the jobs of each stage that ran here."""
import time

from loco_det import grid as benchmark
from loco_det.grid import Job


def _jobs():
    return ([Job(f"pre/{i}", "pretrain", [], "") for i in range(3)]
            + [Job(f"ro/{i}", "readout", [], "") for i in range(3)]
            + [Job("det/0", "detection", [], ""), Job("report", "report", [], "")])


def test_what_is_left_is_estimated_per_stage_and_divided_by_the_workers():
    jobs = _jobs()
    status = {"pre/0": "done", "pre/1": "done", "ro/0": "done", "ro/1": "skipped"}
    took = {"pre/0": 100.0, "pre/1": 300.0, "ro/0": 10.0}
    line = benchmark.progress_line(jobs, status, took, 2, time.time() - 125)
    # left: pre/2 at the pretraining mean (200 s) + ro/2 at 10 s, two at a time: 105 s;
    # detection has not run yet, the report is not counted; the skipped readout is settled
    assert line.startswith("4/8 settled, 2m05s elapsed, ~1m45s left + detection (none timed")


def test_nothing_left_when_everything_settled():
    jobs = _jobs()
    status = {job.id: "done" for job in jobs}
    took = {job.id: 5.0 for job in jobs}
    line = benchmark.progress_line(jobs, status, took, 1, time.time())
    assert line == "8/8 settled, 0s elapsed, ~0s left"
