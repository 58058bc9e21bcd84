"""The pretraining loop: one process or many (torchrun), CPU or CUDA, exact resume.

Written in the style of torchvision's reference scripts: one `train()` that sets things up and
a plain loop over epochs and batches. What is unusual, and why:

* No DistributedDataParallel wrapper. `model.forward_backward` runs several local losses and
  their backward passes itself (that is the point of GIM and LoCo), which DDP's forward hooks
  cannot follow. Instead the model reports each segment's and each decoder's parameters as soon
  as no remaining loss of the step can change their gradients (`grads_ready_hook`), and
  `GradientReducer` starts an asynchronous all-reduce of them right there, so communication
  runs while the units above still compute (in LoCo, S1's gradients travel during units 2 and
  3). Before the optimizer step the loop waits for all of them and divides by the world size.
  Because NT-Xent all-gathers the embeddings with gradient, the averaged gradient is the
  gradient of the loss over the whole global batch.
* Everything that decides what a step sees is a function of (seed, epoch, step): the data order
  (see data.py), the augmentations, the learning rate. Together with the optimizer state and the
  RNG states in the checkpoint, a resumed run repeats the uninterrupted one bit for bit on CPU.
* All checks of user input (config, world size, data directory, resume checkpoint) run before
  anything is written to the output directory, and checkpoints are only ever replaced
  atomically, so a mistake never damages an existing run.
"""
import datetime
import hashlib
import json
import os
import pickle
import random
import sys
import time

import numpy as np
import torch
import yaml
import torch.distributed as dist
from tqdm import tqdm

from ..fingerprint import PRETRAIN_RUN_ONLY, changed_keys, pretrain_fingerprint, pretrain_identity
from ..records import PretrainRunInfo, PretrainSummary
from ..utils import (ConfigError, LocoError, atomic_write, check_output_dir, draw_seed, run_info,
                     write_json)
from .augment import views_to_device
from .data import build_loader
from .knn import PeriodicKnn
from .optim import build_optimizer, build_scheduler

CHECKPOINT = "checkpoint_last.pth"
CHECKPOINT_FORMAT = 1
COMM_STATS = ("buckets", "early", "done_at_wait", "wait_s")  # GradientReducer.wait()'s counters
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # RUN.AMP


# ----------------------------------------------------------------------------- distributed
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


# ----------------------------------------------------------------------------- RNG state
def rng_state(device):
    """This process's RNG states as plain lists and tensors (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def set_rng_state(state, device):
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path):
    """The checkpoint dict, or LocoError naming `path` if it cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LocoError(f"{path}: cannot read checkpoint (not a file written by torch.save, or "
                        "it holds objects other than tensors and containers, which loco_det "
                        "does not unpickle)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise LocoError(f"{path}: cannot read checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "encoder" not in ckpt or "method" not in ckpt:
        raise LocoError(f"{path}: not a loco_det pretraining checkpoint")
    return ckpt


def describe_checkpoint(ckpt):
    return (f"MODEL.METHOD={ckpt.get('method')}, MODEL.ARCH={ckpt.get('arch')}, "
            f"epoch {ckpt.get('epoch')}, step {ckpt.get('step')}")


def check_resume_compatible(path, ckpt, cfg, steps_per_epoch, num_classes=None):
    """One clear line when the checkpoint cannot continue under this config: every key outside
    the run-only list (loco_det/fingerprint.py) that differs from the checkpoint's config is
    named with both values; then the data must give the same number of steps per epoch. The
    data-derived checks come first: they name the more specific cause."""
    classifier = ckpt["decoders"].get("0.fc.weight")
    if cfg.MODEL.METHOD == "supervised" and classifier is not None \
            and classifier.shape[0] != num_classes:
        raise LocoError(f"{path}: checkpoint's classifier has {classifier.shape[0]} classes, "
                        f"DATA.ROOT={cfg.DATA.ROOT} has {num_classes}")
    changed = changed_keys(pretrain_identity(ckpt["config"]), pretrain_identity(cfg),
                           PRETRAIN_RUN_ONLY)
    if changed:
        raise LocoError(
            f"{path}: the config differs from the run being resumed in "
            + ", ".join(f"{k} (checkpoint {a!r}, config {b!r})" for k, a, b in changed)
            + "; only run-only keys may change (loco_det/fingerprint.py): use the run's own "
              "config or another --output-dir")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise LocoError(
            f"{path}: checkpoint has {ckpt['steps_per_epoch']} steps per epoch, this config "
            f"gives {steps_per_epoch} (OPTIM.BATCH_SIZE={cfg.OPTIM.BATCH_SIZE}, DATA.ROOT, "
            f"DATA.MAX_IMAGES must match the run being resumed)")


def encoder_state(model):
    """Torchvision-named, contiguous CPU tensors (loads strict=True into resnetXX())."""
    return {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}


def save_checkpoint(path, model, optimizer, scheduler, cfg, env, epoch, step, steps_per_epoch,
                    bad_indices, wall_time_s, last_log=None):
    """Gather every rank's RNG state, then rank 0 writes the checkpoint atomically."""
    if env.distributed:
        average_buffers(model, env.world_size)
    rng = env.all_gather_object(rng_state(env.device))
    if not env.main:
        return
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "encoder": encoder_state(model),
        "decoders": {k: v.detach().cpu() for k, v in model.decoders.state_dict().items()},
        "config": cfg.dump(),
        "fingerprint": pretrain_fingerprint(cfg),   # run identity, seed excluded
        "method": cfg.MODEL.METHOD,
        "arch": cfg.MODEL.ARCH,
        "epoch": epoch,                      # completed epochs
        "step": step,                        # completed optimizer steps
        "steps_per_epoch": steps_per_epoch,
        "world_size": env.world_size,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,                          # one entry per rank
        "bad_images": sorted(bad_indices),
        "wall_time_s": wall_time_s,
        "last_log": last_log,                # the last metrics.jsonl record (final losses)
    }
    if getattr(model, "loss_scaler", None) is not None:  # RUN.AMP=fp16: the dynamic loss scale
        ckpt["grad_scaler"] = model.loss_scaler.state_dict()
    with atomic_write(path) as f:
        torch.save(ckpt, f)


# ----------------------------------------------------------------------------- logging
class MetricLogger:
    """Rank 0's metrics.jsonl and TensorBoard writer (the latter imported lazily: slow)."""

    def __init__(self, output_dir, env, start_step, resume):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if not env.main:
            return
        records = []
        if resume and os.path.exists(self.path):
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


# ----------------------------------------------------------------------------- setup
def resolve_seed(cfg, env, ckpt):
    """The run's seed: the checkpoint's when resuming, else SEED, else drawn on rank 0."""
    if ckpt is not None:
        seed = int(ckpt_cfg_value(ckpt, "SEED"))
        if cfg.SEED not in (-1, seed):
            notice(env, f"SEED={cfg.SEED} ignored: resuming continues the checkpoint's "
                        f"SEED={seed}")
        return seed
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    return env.broadcast_int(draw_seed())


def ckpt_cfg_value(ckpt, key):
    return yaml.safe_load(ckpt["config"])[key]


def with_seed(cfg, seed):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SEED = seed
    cfg.freeze()
    return cfg


def setup_model(cfg, env, num_classes=None):
    """The model of `cfg`; `num_classes` (the ImageFolder's) sizes the supervised classifier."""
    from .model import build_model
    from .rules import RuleError

    d = cfg.MODEL.DECODER
    try:
        model = build_model(cfg.MODEL.METHOD, cfg.MODEL.ARCH, conv_blocks=d.CONV_BLOCKS,
                            mlp_layers=d.MLP_LAYERS, proj_dim=d.PROJ_DIM,
                            hidden_dim=d.HIDDEN_DIM, temperature=cfg.LOSS.TEMPERATURE,
                            loco_schedule=cfg.MODEL.LOCO_SCHEDULE, num_classes=num_classes,
                            supervised_views=cfg.LOSS.SUPERVISED_VIEWS,
                            unit_length=cfg.MODEL.LOCO_BLOCKS.UNIT_LENGTH,
                            overlap=cfg.MODEL.LOCO_BLOCKS.OVERLAP)
    except RuleError as e:
        raise ConfigError(f"MODEL.METHOD: {e}") from None
    if cfg.MODEL.SYNC_BN:
        if not env.distributed:
            notice(env, "MODEL.SYNC_BN has no effect on a single process")
        elif env.device.type != "cuda":
            notice(env, "MODEL.SYNC_BN ignored on CPU (torch's SyncBatchNorm needs CUDA); "
                        "BN statistics are per process")
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if env.device.type == "cuda":
        if cfg.RUN.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        model.autocast_dtype = AUTOCAST_DTYPES[cfg.RUN.AMP]
        if model.autocast_dtype == torch.float16:
            model.loss_scaler = torch.amp.GradScaler("cuda")
    elif cfg.RUN.AMP != "off" or cfg.RUN.CHANNELS_LAST:
        notice(env, "RUN.AMP / RUN.CHANNELS_LAST apply on CUDA only; training in float32 on CPU")
    return model


def record_resume(output_dir, env, step):
    """Keep the original run_info.json; append this invocation to its "resumes" list."""
    path = os.path.join(output_dir, "run_info.json")
    info = {}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    entry = run_info(env.world_size, from_step=step, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    entry.pop("versions")
    info.setdefault("resumes", []).append(entry)
    return path, info


# ----------------------------------------------------------------------------- train
def train(cfg, output_dir, resume=False, stop_after_steps=None, config_file=None):
    """Pretrain `cfg.MODEL.ARCH` with `cfg.MODEL.METHOD`; write everything to `output_dir`.

    resume: continue from output_dir/checkpoint_last.pth (a fresh start if there is none).
    stop_after_steps: return after this many optimizer steps of this call, exactly as if the
      process were killed there (nothing extra is written); for tests and time-limited jobs.
    Returns the summary dict on rank 0 when the run has finished, else None.
    """
    env = DistEnv(cfg.RUN.DIST_BACKEND, cfg.RUN.DIST_TIMEOUT_MIN)
    check_output_dir(output_dir)
    if cfg.OPTIM.BATCH_SIZE % env.world_size:  # before joining: fails fast on every rank
        raise ConfigError(f"OPTIM.BATCH_SIZE={cfg.OPTIM.BATCH_SIZE} does not divide by the "
                          f"world size {env.world_size}: batch sizes are global, choose a "
                          f"multiple of {env.world_size}")
    local_batch = cfg.OPTIM.BATCH_SIZE // env.world_size
    if local_batch % cfg.OPTIM.ACCUM_STEPS:
        raise ConfigError(f"OPTIM.ACCUM_STEPS={cfg.OPTIM.ACCUM_STEPS} does not divide the batch "
                          f"of each process, {local_batch} (OPTIM.BATCH_SIZE="
                          f"{cfg.OPTIM.BATCH_SIZE} on {env.world_size} processes)")
    env.init()
    try:
        return _train(cfg, output_dir, resume, stop_after_steps, config_file, env)
    finally:
        env.close()


def _train(cfg, output_dir, resume, stop_after_steps, config_file, env):
    t_start = time.time()
    # ---- validate everything before touching output_dir
    ckpt_path = os.path.join(output_dir, CHECKPOINT)
    ckpt = None
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if not resume:
            raise LocoError(f"{ckpt_path} already exists ({describe_checkpoint(ckpt)}); pass "
                            f"--resume to continue that run, or choose another --output-dir")
    elif resume:
        notice(env, f"--resume: no {ckpt_path} yet, starting from scratch")
    seed = resolve_seed(cfg, env, ckpt)
    cfg = with_seed(cfg, seed)
    dataset, sampler, loader = build_loader(cfg, env.rank, env.world_size, seed)
    knn = PeriodicKnn.build(cfg, env)
    steps_per_epoch = sampler.batches_per_epoch
    if ckpt is not None:
        check_resume_compatible(ckpt_path, ckpt, cfg, steps_per_epoch, len(dataset.classes))

    seed_everything(seed)  # same on every rank: identical initial weights
    model = setup_model(cfg, env, num_classes=len(dataset.classes))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    epochs = cfg.OPTIM.EPOCHS
    total_steps = epochs * steps_per_epoch

    start_step, bad, wall_before, last_logged = 0, set(), 0.0, None
    if ckpt is not None:
        model.encoder.load_state_dict(ckpt["encoder"])
        model.decoders.load_state_dict(ckpt["decoders"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if model.loss_scaler is not None and "grad_scaler" in ckpt:
            model.loss_scaler.load_state_dict(ckpt["grad_scaler"])
        start_step = ckpt["step"]
        bad = set(ckpt.get("bad_images", []))
        wall_before = ckpt.get("wall_time_s", 0.0)
        last_logged = ckpt.get("last_log")
        rng = ckpt["rng"]
        set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0], env.device)
        del ckpt
    elif env.distributed:
        broadcast_state(model)
    reducer = None
    if env.world_size > 1:  # averages the gradients during the backward
        reducer = model.grads_ready_hook = GradientReducer(model, env.world_size)

    # ---- from here on, output_dir is written
    if env.main:
        os.makedirs(output_dir, exist_ok=True)
        with atomic_write(os.path.join(output_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        if resume and start_step > 0:
            path, info = record_resume(output_dir, env, start_step)
            write_json(path, info)
        else:
            PretrainRunInfo(
                **run_info(env.world_size), method=cfg.MODEL.METHOD, arch=cfg.MODEL.ARCH,
                global_batch=cfg.OPTIM.BATCH_SIZE, epochs=epochs, config_file=config_file,
                seed=seed, fingerprint=pretrain_fingerprint(cfg), device=str(env.device),
                dataset_images=len(dataset), steps_per_epoch=steps_per_epoch).write(output_dir)
    logger = MetricLogger(output_dir, env, start_step, resume)
    if env.main:
        print(f"{cfg.MODEL.METHOD} {cfg.MODEL.ARCH}: {len(dataset)} images, global batch "
              f"{cfg.OPTIM.BATCH_SIZE} on {env.world_size} process(es) ({env.device}), "
              f"{steps_per_epoch} steps/epoch, {epochs} epochs, seed {seed}"
              + (f", resuming at step {start_step}" if start_step else ""), flush=True)

    try:
        return _loop(cfg, output_dir, env, model, optimizer, scheduler, dataset, sampler,
                     loader, logger, start_step, steps_per_epoch, total_steps, bad, wall_before,
                     t_start, stop_after_steps, knn, last_logged, reducer)
    finally:
        logger.close()


def _loop(cfg, output_dir, env, model, optimizer, scheduler, dataset, sampler, loader,
          logger, start_step, steps_per_epoch, total_steps, bad, wall_before, t_start,
          stop_after_steps, knn=None, last_logged=None, reducer=None):
    epochs = cfg.OPTIM.EPOCHS
    ckpt_path = os.path.join(output_dir, CHECKPOINT)
    units = list(model.unit_names)
    max_bad = cfg.DATA.MAX_BAD_FRACTION * len(dataset)
    warned = [bool(bad)]
    memory_format = (torch.channels_last if env.device.type == "cuda" and cfg.RUN.CHANNELS_LAST
                     else torch.contiguous_format)
    step = start_step
    last = last_logged   # a run resumed at its end still reports its final losses
    scaler = model.loss_scaler
    # The window's loss sums and the first step with a non-finite loss (0: none) stay on the
    # device: the host reads them only every LOG_PERIOD steps and before a checkpoint, so it
    # never waits for the GPU inside a step.
    window = {"loss": torch.zeros(len(units), dtype=torch.float64, device=env.device),
              "bad_step": torch.zeros((), dtype=torch.int64, device=env.device),
              "steps": 0, "t": time.time(), "comm": dict.fromkeys(COMM_STATS, 0.0)}

    def note_bad(indices):
        for i in indices:
            if i >= 0 and i not in bad:
                bad.add(i)
                if not warned[0] and env.main:
                    warned[0] = True
                    tqdm.write(f"warning: skipping unreadable image {dataset.path(i)} (further "
                               f"unreadable images are counted, not listed)", file=sys.stderr)
        if len(bad) > max_bad:
            first = dataset.path(min(bad))
            raise LocoError(f"{cfg.DATA.ROOT}: {len(bad)} of {len(dataset)} images are "
                            f"unreadable, more than DATA.MAX_BAD_FRACTION="
                            f"{cfg.DATA.MAX_BAD_FRACTION} (first: {first})")

    def check_finite():
        """Raise on every rank if any rank saw a non-finite loss since the last check (before
        the weights it produced are logged or saved)."""
        bad_step = torch.where(window["bad_step"] > 0, window["bad_step"], total_steps + 1)
        if env.distributed:
            dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
        first = int(bad_step.item())
        if first <= total_steps:
            raise LocoError(f"non-finite loss at step {first}; lower OPTIM.BASE_LR or check "
                            f"the data")

    def checkpoint(done_epochs):
        check_finite()
        save_checkpoint(ckpt_path, model, optimizer, scheduler, cfg, env, done_epochs, step,
                        steps_per_epoch, bad, wall_before + time.time() - t_start, last)

    def log(lr):
        check_finite()
        stats = torch.cat([window["loss"], window["loss"].new_tensor([window["steps"]])])
        if env.distributed:
            dist.all_reduce(stats)
        stats = stats.cpu()
        count = max(1.0, stats[-1].item())
        elapsed = max(1e-9, time.time() - window["t"])
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                  "images_per_s": count / env.world_size * cfg.OPTIM.BATCH_SIZE / elapsed}
        record.update({f"loss/{u}": stats[k].item() / count for k, u in enumerate(units)})
        if reducer is not None:  # rank 0's own, per step
            steps = max(1, window["steps"])
            record.update({f"comm/{k}": v / steps for k, v in window["comm"].items()})
            window["comm"] = dict.fromkeys(COMM_STATS, 0.0)
        if scaler is not None:
            record["amp/loss_scale"] = float(scaler.get_scale())
        window["loss"].zero_()
        window["steps"] = 0
        window["t"] = time.time()
        logger.log(record)
        return record

    def train_step(view1, view2, labels):
        """One optimizer step on a batch of view pairs (and their ImageFolder labels, used by
        the supervised rule); returns the lr used. Nothing in it waits for the GPU (except
        GradScaler's decision to skip a step, RUN.AMP=fp16)."""
        # uint8 from the loader; normalised (and, with DATA.AUGMENT_DEVICE=cuda, augmented) here
        view1 = views_to_device(view1, env.device, memory_format)
        view2 = views_to_device(view2, env.device, memory_format)
        labels = labels.to(env.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if reducer is not None:
            reducer.begin()
        losses = model.forward_backward(view1, view2, labels,
                                        accum_steps=cfg.OPTIM.ACCUM_STEPS, as_floats=False)
        if reducer is not None:
            # All-reduces started during the backward; finished before anything reads .grad.
            for k, v in reducer.wait().items():
                window["comm"][k] += v
        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:   # unscales, skips the step on inf/nan gradients (same on all ranks)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        vec = torch.stack([losses[u] for u in units]).to(torch.float64)
        window["loss"] += vec
        window["bad_step"] = torch.where((window["bad_step"] == 0) & ~torch.isfinite(vec).all(),
                                         step + 1, window["bad_step"])
        window["steps"] += 1
        return lr

    summary_path = os.path.join(output_dir, "summary.json")
    if step >= total_steps and os.path.exists(summary_path):
        notice(env, f"{output_dir}: the run has already finished ({step} steps)")
        with open(summary_path) as f:
            return json.load(f) if env.main else None

    for epoch in range(start_step // steps_per_epoch, epochs):
        first_batch = step - epoch * steps_per_epoch
        sampler.set_epoch(epoch, first_batch)
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=first_batch, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not env.main, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        try:  # the bar is closed before an error propagates: its line starts clean
            for batch_idx, (view1, view2, labels, bad_idx) in enumerate(loader,
                                                                        start=first_batch):
                note_bad(bad_idx.tolist())
                lr = train_step(view1, view2, labels)
                step += 1
                bar.update(1)
                end_of_epoch = batch_idx + 1 == steps_per_epoch
                if step % cfg.RUN.LOG_PERIOD == 0 or end_of_epoch:
                    last = log(lr)
                    bar.set_postfix({**{u: f"{last['loss/' + u]:.3f}" for u in units},
                                     "lr": f"{lr:.3g}", "img/s": f"{last['images_per_s']:.0f}"},
                                    refresh=False)
                if end_of_epoch:
                    if env.distributed:  # other ranks' unreadable files, before the checkpoint
                        note_bad(set().union(*env.all_gather_object(sorted(bad))))
                    checkpoint(epoch + 1)
                    if knn is not None and knn.due(epoch + 1):  # every rank takes part
                        logger.log(knn(model.encoder, step, epoch + 1))
                        model.train()
                elif cfg.RUN.CHECKPOINT_PERIOD and step % cfg.RUN.CHECKPOINT_PERIOD == 0:
                    checkpoint(epoch)
                if stop_after_steps is not None and step - start_step >= stop_after_steps:
                    return None
        finally:
            bar.close()

    # Ranks must end with identical weights; record each rank's hash so that it can be checked.
    hashes = env.all_gather_object(model_params_sha256(model))
    if len(set(hashes)) > 1:
        notice(env, f"ranks ended with different weights: {hashes}")
    summary = PretrainSummary(
        finished=True, epochs=epochs, steps=step, param_sha256=hashes,
        final_losses=({u: last[f"loss/{u}"] for u in units} if last else None),
        bad_images=len(bad), world_size=env.world_size,
        wall_time_s=wall_before + time.time() - t_start)
    if reducer is not None and reducer.backward_end_s is not None:
        summary.comm_last_step = {"backward_end_s": reducer.backward_end_s,
                                  "buckets": reducer.timeline}
    summary = summary.to_json()
    if env.main:
        write_json(summary_path, summary)
        print(f"finished: {step} steps, final losses "
              + ", ".join(f"{u} {v:.4f}" for u, v in (summary["final_losses"] or {}).items()),
              flush=True)
    return summary if env.main else None
