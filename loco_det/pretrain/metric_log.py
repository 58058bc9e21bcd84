"""Rank 0's training log: metrics.jsonl (one JSON object per logging step, docs/formats.md) and
TensorBoard scalars."""
import json
import os

from ..utils import atomic_write

class MetricLogger:
    """Rank 0's metrics.jsonl and TensorBoard writer (the latter imported lazily: slow)."""

    def __init__(self, output_dir, env, start_step, resume):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if not env.main:
            return
        records = []
        # At step 0 nothing is kept: the run starts over, and logs the kNN monitor's step-0
        # record again.
        if resume and start_step > 0 and os.path.exists(self.path):
            # Drop what a killed run logged after its last checkpoint: those steps run again.
            # A line without its newline is what a SIGKILL during the append left: drop it.
            with open(self.path) as f:
                records = [line for line in f if line.strip() and line.endswith("\n")
                           and json.loads(line).get("step", 0) <= start_step]
        with atomic_write(self.path, "w") as f:
            f.writelines(records)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(output_dir, "tb"),
                                purge_step=start_step + 1 if resume else None)

    def log(self, record):
        if self.tb is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch"):
                self.tb.add_scalar(key, value, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
