"""Pretraining checkpoints: checkpoint_last.pth (docs/formats.md) written atomically, read
with torch's weights-only unpickler, checked before a resume, and the RNG states it carries
(a resumed run repeats the uninterrupted one bit for bit on CPU)."""
import dataclasses
import pickle
import random
from typing import Optional

import numpy as np
import torch

from ..fingerprint import PRETRAIN_RUN_ONLY, changed_keys, pretrain_fingerprint, pretrain_identity
from ..utils import LocoError, atomic_write
from .dist import average_buffers

CHECKPOINT = "checkpoint_last.pth"
CHECKPOINT_FORMAT = 1

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


def check_resume_compatible(path, ckpt, cfg, steps_per_epoch, num_classes=None, model=None):
    """One clear line when the checkpoint cannot continue under this config: for a rule that
    takes labels, its decoders must have the shapes of `model`'s, when given (a classifier's
    classes come from the data, DATA.ROOT: `num_classes`); every key outside the run-only list (loco_det/fingerprint.py) that differs
    from the checkpoint's config is named with both values; then the data must give the same
    number of steps per epoch. The data-derived checks come first: they name the more specific
    cause."""
    # Other decoders' shapes follow from the config, whose differences are named below.
    expected = model.decoders.state_dict() if model is not None and model.rule.takes_labels \
        else {}
    for key, value in ckpt["decoders"].items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise LocoError(f"{path}: checkpoint's classifier has {value.shape[0]} classes, "
                            f"DATA.ROOT={cfg.DATA.ROOT} has {num_classes} (decoder {key}: "
                            f"shape {tuple(value.shape)}, here {tuple(expected[key].shape)})")
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


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint saves and a resume restores, beside the weights,
    optimizer, scheduler and RNG states."""
    step: int = 0                  # completed optimizer steps
    bad: set = dataclasses.field(default_factory=set)   # unreadable images' dataset indices
    wall_before: float = 0.0       # seconds spent by the invocations before this one
    last: Optional[dict] = None    # the last metrics.jsonl record (a finished run's final losses)

    @classmethod
    def from_checkpoint(cls, ckpt):
        return cls(step=ckpt["step"], bad=set(ckpt.get("bad_images", [])),
                   wall_before=ckpt.get("wall_time_s", 0.0), last=ckpt.get("last_log"))


def save_checkpoint(path, model, optimizer, scheduler, cfg, env, epoch, steps_per_epoch,
                    progress, wall_time_s):
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
        "step": progress.step,               # completed optimizer steps
        "steps_per_epoch": steps_per_epoch,
        "world_size": env.world_size,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,                          # one entry per rank
        "bad_images": sorted(progress.bad),
        "wall_time_s": wall_time_s,
        "last_log": progress.last,           # the last metrics.jsonl record (final losses)
    }
    if getattr(model, "loss_scaler", None) is not None:  # RUN.AMP=fp16: the dynamic loss scale
        ckpt["grad_scaler"] = model.loss_scaler.state_dict()
    with atomic_write(path) as f:
        torch.save(ckpt, f)
