"""Distributed helpers of the pretraining loop: the process's rank, world size and device
(`DistEnv`), the gradient all-reduce that runs during the backward (`GradientReducer`; why
there is no DistributedDataParallel: engine.py), and cross-rank state checks."""
import datetime
import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist

from ..utils import ConfigError, LocoError

COMM_STATS = ("buckets", "early", "done_at_wait", "wait_s")  # GradientReducer.wait()'s counters

class DistEnv:
    """rank / world size / device of this process, from torchrun's environment variables.

    `backend`: "" (nccl on CUDA, gloo on CPU), "nccl" or "gloo" (RUN.DIST_BACKEND); with gloo
    on CUDA, processes share the visible GPUs (cuda:LOCAL_RANK mod their number), which nccl
    refuses. `timeout_min`: how long a collective waits for the slowest rank (RUN.DIST_TIMEOUT_MIN;
    None: torch's default)."""

    def __init__(self, backend="", timeout_min=None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        cuda = torch.cuda.is_available()
        self.backend = backend or ("nccl" if cuda else "gloo")
        self.timeout = datetime.timedelta(minutes=timeout_min) if timeout_min else None
        if not cuda:
            self.device = torch.device("cpu")
        elif self.backend == "gloo":
            self.device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
        else:
            self.device = torch.device("cuda", self.local_rank)

    def init(self):
        """Join the process group (nccl on CUDA, gloo on CPU, or RUN.DIST_BACKEND) when started
        by torchrun."""
        if self.backend == "nccl" and self.device.type != "cuda":
            raise ConfigError("RUN.DIST_BACKEND=nccl needs CUDA, and no GPU is visible; leave "
                              "it empty (gloo on CPU)")
        if self.device.type == "cuda":
            count = torch.cuda.device_count()
            if self.device.index >= count:
                raise LocoError(f"process LOCAL_RANK={self.local_rank} needs a GPU of its own "
                                f"but {count} are visible: start at most {count} processes per "
                                f"node, or set RUN.DIST_BACKEND=gloo to let processes share one")
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        if self.distributed and not dist.is_initialized():
            extra = {"device_id": self.device} if self.backend == "nccl" else {}
            if self.timeout is not None:
                extra["timeout"] = self.timeout
            dist.init_process_group(self.backend, **extra)
            self.owns_group = True

    @property
    def distributed(self):
        """In a process group: several processes, or one started by torchrun (which sets what
        the env:// rendezvous reads), taking the same nccl / gloo and SyncBN paths as many."""
        return self.world_size > 1 or all(k in os.environ for k in ("WORLD_SIZE", "RANK",
                                                                    "MASTER_ADDR"))

    @property
    def main(self):
        return self.rank == 0

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def broadcast_int(self, value):
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0)
        return int(t.item())

    def all_gather_object(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def notice(env, message):
    if env.main:
        print(f"notice: {message}", file=sys.stderr, flush=True)


class GradientReducer:
    """Averages gradients over ranks while the backward still runs: the model's
    `grads_ready_hook` (model.py calls it with each segment's and each decoder's parameters as
    soon as no remaining loss of the step can change their `.grad`).

    Each call flattens those gradients into buckets (at most `bucket_bytes`, one dtype each)
    and starts `all_reduce(SUM)` on them asynchronously; `wait()`, before the optimizer step,
    waits for all of them, divides by the world size and copies the averages back into
    `.grad`. Every rank runs the same model code, so every rank launches the same buckets in the
    same order. `begin()` opens a step: hook calls may come from any number of backward passes
    in between (with gradient accumulation only the last micro-batch's replay reports), but a
    parameter reported twice in a step, or one left with a gradient it never reported, is an
    error, not a silently unaveraged gradient.

    Per step it measures `buckets`, `early` (buckets launched before the step's last report,
    i.e. while gradients of other parameters were still being computed), `done_at_wait`
    (buckets whose all-reduce had already finished when `wait()` began: communication fully
    hidden behind compute) and `wait_s` (the time `wait()` blocked); `timeline` lists the last
    step's buckets: first parameter's name, parameter count, bytes, launch time after `begin()`,
    finished at the wait, with `backward_end_s` (when `wait()` began). Times are the host's:
    on CUDA a launch is queued behind the kernels that computed its gradients and `wait()` only
    orders the streams, so there `done_at_wait` is the measure and `wait_s` stays near 0."""

    def __init__(self, model, world_size, bucket_bytes=32 << 20):
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pending, self.reported, self.timeline = [], set(), []
        self.t0 = self.last_report_s = self.backward_end_s = None

    def begin(self):
        if self.pending:
            raise RuntimeError("GradientReducer.begin: the previous step's all-reduces were "
                               "never waited for")
        self.reported, self.timeline = set(), []
        self.t0 = time.perf_counter()
        self.last_report_s = None

    def __call__(self, params):
        if self.t0 is None:
            raise RuntimeError("GradientReducer: gradients reported outside a step (begin() "
                               "was not called)")
        now = time.perf_counter() - self.t0
        self.last_report_s = now
        bucket, size = [], 0
        for p in params:
            if id(p) in self.reported:
                raise RuntimeError(f"GradientReducer: {self.names.get(id(p), '?')} reported "
                                   f"twice in one step")
            self.reported.add(id(p))
            if p.grad is None:
                continue
            nbytes = p.grad.numel() * p.grad.element_size()
            if bucket and (size + nbytes > self.bucket_bytes or p.grad.dtype != bucket[0].grad.dtype
                           or p.grad.device != bucket[0].grad.device):
                self._launch(bucket, size, now)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        if bucket:
            self._launch(bucket, size, now)

    def _launch(self, bucket, size, now):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        work = dist.all_reduce(flat, async_op=True)
        self.pending.append((work, flat, bucket))
        self.timeline.append({"first": self.names.get(id(bucket[0]), "?"), "params": len(bucket),
                              "bytes": size, "launch_s": now})

    def wait(self):
        """Finish the step's averaging; returns the step's counters (see the class doc)."""
        start = time.perf_counter()
        self.backward_end_s = start - self.t0
        unreported = [self.names.get(id(p), "?") for p in self.params
                      if p.grad is not None and id(p) not in self.reported]
        done = 0
        for (work, flat, bucket), entry in zip(self.pending, self.timeline):
            entry["done_at_wait"] = bool(work.is_completed())
            done += entry["done_at_wait"]
        for work, flat, bucket in self.pending:
            work.wait()
            flat.div_(self.world_size)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self.pending, self.t0 = [], None
        if unreported:
            raise RuntimeError(f"GradientReducer: parameters with a gradient never reported "
                               f"final, so not averaged: {', '.join(unreported[:5])}"
                               + (" ..." if len(unreported) > 5 else ""))
        early = sum(e["launch_s"] < self.last_report_s for e in self.timeline)
        return {"buckets": len(self.timeline), "early": early, "done_at_wait": done,
                "wait_s": time.perf_counter() - start}


def broadcast_state(module):
    """Make every rank start from rank 0's parameters and buffers."""
    for t in module.state_dict().values():
        dist.broadcast(t, 0)


def average_buffers(module, world_size):
    """Average BN running statistics over ranks (they differ without SyncBN), so the saved
    encoder's statistics describe all the data, not rank 0's shard."""
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size)


def params_sha256(named_params):
    """sha256 over (name, bytes) of parameters, in order: a cheap cross-rank equality check."""
    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_params_sha256(model):
    """Hash of the encoder's then the decoders' parameters (prefixes "encoder.", "decoders.")."""
    return params_sha256([("encoder." + n, p) for n, p in model.encoder.named_parameters()]
                         + [("decoders." + n, p) for n, p in model.decoders.named_parameters()])
