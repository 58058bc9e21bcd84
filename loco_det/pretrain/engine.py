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
import json
import os
import sys
import time
import torch
import yaml
import torch.distributed as dist
from tqdm import tqdm

from ..fingerprint import pretrain_fingerprint
from ..records import PretrainRunInfo, PretrainSummary
from ..utils import (ConfigError, LocoError, atomic_write, check_output_dir, draw_seed,
                     get_dotted, run_info, write_json)
from .augment import views_to_device
from .checkpoint import (CHECKPOINT, Progress, check_resume_compatible, describe_checkpoint,
                         load_checkpoint, save_checkpoint, seed_everything, set_rng_state)
from .data import build_loader
from .dist import (COMM_STATS, DistEnv, GradientReducer, broadcast_state, model_params_sha256,
                   notice)
from .knn import PeriodicKnn
from .metric_log import MetricLogger
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .rules import RuleError, rule_needs

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # RUN.AMP

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
    d = cfg.MODEL.DECODER
    try:
        options = {name: get_dotted(cfg, opt.key)   # the rule's own config keys
                   for name, opt in rule_needs(cfg.MODEL.METHOD).options.items()}
        model = build_model(cfg.MODEL.METHOD, cfg.MODEL.ARCH, conv_blocks=d.CONV_BLOCKS,
                            mlp_layers=d.MLP_LAYERS, proj_dim=d.PROJ_DIM,
                            hidden_dim=d.HIDDEN_DIM, temperature=cfg.LOSS.TEMPERATURE,
                            loco_schedule=cfg.MODEL.LOCO_SCHEDULE, num_classes=num_classes,
                            **options)
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
def train(cfg, output_dir, resume=False, stop_after_steps=None, config_file=None, progress=True):
    """Pretrain `cfg.MODEL.ARCH` with `cfg.MODEL.METHOD`; write everything to `output_dir`.

    resume: continue from output_dir/checkpoint_last.pth (a fresh start if there is none).
    stop_after_steps: return after this many optimizer steps of this call, exactly as if the
      process were killed there (nothing extra is written); for tests and time-limited jobs.
    progress: draw the run's progress bar (rank 0).
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
        return _train(cfg, output_dir, resume, stop_after_steps, config_file, env, progress)
    finally:
        env.close()


def _train(cfg, output_dir, resume, stop_after_steps, config_file, env, show_progress=True):
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
    seed_everything(seed)  # same on every rank: identical initial weights
    model = setup_model(cfg, env, num_classes=len(dataset.classes))
    if ckpt is not None:
        check_resume_compatible(ckpt_path, ckpt, cfg, steps_per_epoch, len(dataset.classes),
                                model)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)

    progress = Progress()
    if ckpt is not None:
        model.encoder.load_state_dict(ckpt["encoder"])
        model.decoders.load_state_dict(ckpt["decoders"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if model.loss_scaler is not None and "grad_scaler" in ckpt:
            model.loss_scaler.load_state_dict(ckpt["grad_scaler"])
        progress = Progress.from_checkpoint(ckpt)
        rng = ckpt["rng"]
        set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0], env.device)
        del ckpt
    elif env.distributed:
        broadcast_state(model)
    reducer = None
    if env.world_size > 1:  # averages the gradients during the backward
        reducer = model.grads_ready_hook = GradientReducer(model, env.world_size)

    # ---- from here on, output_dir is written
    start_step = progress.step
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
                global_batch=cfg.OPTIM.BATCH_SIZE, epochs=cfg.OPTIM.EPOCHS,
                config_file=config_file, seed=seed, fingerprint=pretrain_fingerprint(cfg),
                device=str(env.device), dataset_images=len(dataset),
                steps_per_epoch=steps_per_epoch).write(output_dir)
    logger = MetricLogger(output_dir, env, start_step, resume)
    if env.main:
        print(f"{cfg.MODEL.METHOD} {cfg.MODEL.ARCH}: {len(dataset)} images, global batch "
              f"{cfg.OPTIM.BATCH_SIZE} on {env.world_size} process(es) ({env.device}), "
              f"{steps_per_epoch} steps/epoch, {cfg.OPTIM.EPOCHS} epochs, seed {seed}"
              + (f", resuming at step {start_step}" if start_step else ""), flush=True)

    try:
        loop = TrainLoop(cfg, output_dir, env, model, optimizer, scheduler,
                         (dataset, sampler, loader), logger, knn, reducer, progress, t_start,
                         show_progress)
        return loop.run(stop_after_steps)
    finally:
        logger.close()


class TrainLoop:
    """The epochs and steps of one invocation, over the pieces `_train` set up; `progress` is
    the state that changes from step to step (and goes into every checkpoint)."""

    def __init__(self, cfg, output_dir, env, model, optimizer, scheduler, data, logger, knn,
                 reducer, progress, t_start, show_progress=True):
        self.cfg, self.output_dir, self.env = cfg, output_dir, env
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.dataset, self.sampler, self.loader = data   # data.build_loader's three
        self.logger, self.knn, self.reducer = logger, knn, reducer
        self.progress, self.t_start = progress, t_start
        self.show_progress = show_progress   # draw the bar (rank 0)
        self.start_step = progress.step
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.OPTIM.EPOCHS * self.steps_per_epoch
        self.units = list(model.unit_names)
        self.max_bad = cfg.DATA.MAX_BAD_FRACTION * len(self.dataset)
        self.warned = bool(progress.bad)
        self.memory_format = (torch.channels_last if env.device.type == "cuda"
                              and cfg.RUN.CHANNELS_LAST else torch.contiguous_format)
        self.scaler = model.loss_scaler
        # The window's loss sums and the first step with a non-finite loss (0: none) stay on
        # the device: the host reads them only every LOG_PERIOD steps and before a checkpoint,
        # so it never waits for the GPU inside a step.
        self.window = {"loss": torch.zeros(len(self.units), dtype=torch.float64,
                                           device=env.device),
                       "bad_step": torch.zeros((), dtype=torch.int64, device=env.device),
                       "steps": 0, "t": time.time(), "comm": dict.fromkeys(COMM_STATS, 0.0)}

    def note_bad(self, indices):
        bad, env, dataset = self.progress.bad, self.env, self.dataset
        for i in indices:
            if i >= 0 and i not in bad:
                bad.add(i)
                if not self.warned and env.main:
                    self.warned = True
                    tqdm.write(f"warning: skipping unreadable image {dataset.path(i)} (further "
                               f"unreadable images are counted, not listed)", file=sys.stderr)
        if len(bad) > self.max_bad:
            first = dataset.path(min(bad))
            raise LocoError(f"{self.cfg.DATA.ROOT}: {len(bad)} of {len(dataset)} images are "
                            f"unreadable, more than DATA.MAX_BAD_FRACTION="
                            f"{self.cfg.DATA.MAX_BAD_FRACTION} (first: {first})")

    def check_finite(self):
        """Raise on every rank if any rank saw a non-finite loss since the last check (before
        the weights it produced are logged or saved)."""
        bad_step = torch.where(self.window["bad_step"] > 0, self.window["bad_step"],
                               self.total_steps + 1)
        if self.env.distributed:
            dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
        first = int(bad_step.item())
        if first <= self.total_steps:
            raise LocoError(f"non-finite loss at step {first}; lower OPTIM.BASE_LR or check "
                            f"the data")

    def checkpoint(self, done_epochs):
        self.check_finite()
        p = self.progress
        save_checkpoint(os.path.join(self.output_dir, CHECKPOINT), self.model, self.optimizer,
                        self.scheduler, self.cfg, self.env, done_epochs, self.steps_per_epoch,
                        p, p.wall_before + time.time() - self.t_start)

    def log(self, lr):
        self.check_finite()
        window, env = self.window, self.env
        stats = torch.cat([window["loss"], window["loss"].new_tensor([window["steps"]])])
        if env.distributed:
            dist.all_reduce(stats)
        stats = stats.cpu()
        count = max(1.0, stats[-1].item())
        elapsed = max(1e-9, time.time() - window["t"])
        step = self.progress.step
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "lr": lr,
                  "images_per_s": count / env.world_size * self.cfg.OPTIM.BATCH_SIZE / elapsed}
        record.update({f"loss/{u}": stats[k].item() / count for k, u in enumerate(self.units)})
        if self.reducer is not None:  # rank 0's own, per step
            steps = max(1, window["steps"])
            record.update({f"comm/{k}": v / steps for k, v in window["comm"].items()})
            window["comm"] = dict.fromkeys(COMM_STATS, 0.0)
        if self.scaler is not None:
            record["amp/loss_scale"] = float(self.scaler.get_scale())
        window["loss"].zero_()
        window["steps"] = 0
        window["t"] = time.time()
        self.logger.log(record)
        return record

    def train_step(self, view1, view2, labels):
        """One optimizer step on a batch of view pairs (and their ImageFolder labels, for the
        rules that take labels); returns the lr used. Nothing in it waits for the GPU (except
        GradScaler's decision to skip a step, RUN.AMP=fp16)."""
        env, optimizer, reducer, window = self.env, self.optimizer, self.reducer, self.window
        # uint8 from the loader; normalised (and, with DATA.AUGMENT_DEVICE=cuda, augmented) here
        view1 = views_to_device(view1, env.device, self.memory_format)
        view2 = views_to_device(view2, env.device, self.memory_format)
        labels = labels.to(env.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if reducer is not None:
            reducer.begin()
        losses = self.model.forward_backward(view1, view2, labels,
                                             accum_steps=self.cfg.OPTIM.ACCUM_STEPS,
                                             as_floats=False)
        if reducer is not None:
            # All-reduces started during the backward; finished before anything reads .grad.
            for k, v in reducer.wait().items():
                window["comm"][k] += v
        lr = optimizer.param_groups[0]["lr"]
        if self.scaler is not None:   # unscales, skips the step on inf/nan gradients (all ranks)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        vec = torch.stack([losses[u] for u in self.units]).to(torch.float64)
        window["loss"] += vec
        window["bad_step"] = torch.where((window["bad_step"] == 0) & ~torch.isfinite(vec).all(),
                                         self.progress.step + 1, window["bad_step"])
        window["steps"] += 1
        return lr

    def run(self, stop_after_steps=None):
        """Train to the end (returns the summary dict on rank 0, else None), or return None
        after `stop_after_steps` steps of this invocation."""
        cfg, env, model, p = self.cfg, self.env, self.model, self.progress
        epochs, steps_per_epoch = cfg.OPTIM.EPOCHS, self.steps_per_epoch
        summary_path = os.path.join(self.output_dir, "summary.json")
        if p.step >= self.total_steps and os.path.exists(summary_path):
            notice(env, f"{self.output_dir}: the run has already finished ({p.step} steps)")
            with open(summary_path) as f:
                return json.load(f) if env.main else None

        if self.knn is not None and p.step == 0:  # every rank: the curve's random start
            self.logger.log(self.knn(model.encoder, 0, 0))
            model.train()
        # One bar for the whole run (its ETA is the run's), titled with the current epoch.
        bar = tqdm(total=self.total_steps, initial=p.step,
                   disable=not (env.main and self.show_progress), dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        try:  # the bar is closed before an error propagates: its line starts clean
            for epoch in range(self.start_step // steps_per_epoch, epochs):
                first_batch = p.step - epoch * steps_per_epoch
                self.sampler.set_epoch(epoch, first_batch)
                model.train()
                bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
                for batch_idx, (view1, view2, labels, bad_idx) in enumerate(self.loader,
                                                                            start=first_batch):
                    self.note_bad(bad_idx.tolist())
                    lr = self.train_step(view1, view2, labels)
                    p.step += 1
                    bar.update(1)
                    end_of_epoch = batch_idx + 1 == steps_per_epoch
                    if p.step % cfg.RUN.LOG_PERIOD == 0 or end_of_epoch:
                        p.last = self.log(lr)
                        bar.set_postfix({**{u: f"{p.last['loss/' + u]:.3f}" for u in self.units},
                                         "lr": f"{lr:.3g}",
                                         "img/s": f"{p.last['images_per_s']:.0f}"},
                                        refresh=False)
                    if end_of_epoch:
                        if env.distributed:  # other ranks' unreadable files, before the checkpoint
                            self.note_bad(set().union(*env.all_gather_object(sorted(p.bad))))
                        self.checkpoint(epoch + 1)
                        if self.knn is not None and self.knn.due(epoch + 1):  # every rank
                            self.logger.log(self.knn(model.encoder, p.step, epoch + 1))
                            model.train()
                    elif cfg.RUN.CHECKPOINT_PERIOD and p.step % cfg.RUN.CHECKPOINT_PERIOD == 0:
                        self.checkpoint(epoch)
                    if stop_after_steps is not None and \
                            p.step - self.start_step >= stop_after_steps:
                        return None
        finally:
            bar.close()
        return self.finish()

    def finish(self):
        """summary.json (rank 0), after checking that every rank ended with the same weights."""
        env, p, reducer, units = self.env, self.progress, self.reducer, self.units
        # Ranks must end with identical weights; record each rank's hash so that it can be checked.
        hashes = env.all_gather_object(model_params_sha256(self.model))
        if len(set(hashes)) > 1:
            notice(env, f"ranks ended with different weights: {hashes}")
        summary = PretrainSummary(
            finished=True, epochs=self.cfg.OPTIM.EPOCHS, steps=p.step, param_sha256=hashes,
            final_losses=({u: p.last[f"loss/{u}"] for u in units} if p.last else None),
            bad_images=len(p.bad), world_size=env.world_size,
            wall_time_s=p.wall_before + time.time() - self.t_start)
        if reducer is not None and reducer.backward_end_s is not None:
            summary.comm_last_step = {"backward_end_s": reducer.backward_end_s,
                                      "buckets": reducer.timeline}
        if env.main:
            summary.write(self.output_dir)
            print(f"finished: {p.step} steps, final losses "
                  + ", ".join(f"{u} {v:.4f}" for u, v in (summary.final_losses or {}).items()),
                  flush=True)
        return summary.to_json() if env.main else None
