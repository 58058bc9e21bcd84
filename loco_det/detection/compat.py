"""loco_det's own adjustments to Detectron2 and fvcore, applied when `loco_det.detection` is imported.

Detectron2 itself needs none of this to work: `tools/install_detectron2.py` (run by `make`)
patches the installed v0.6 for Pillow >= 10, numpy >= 1.24, setuptools without pkg_resources and
missing compiled ops, with the replacements recorded in tools/detectron2_v0.6.patch.json. If
Detectron2 does not import, importing this module fails with one line saying how to fix it.

- Checkpoints: fvcore's `Checkpointer.save` / `tag_last_checkpoint` write the real file name
  directly, so a kill leaves a truncated `model_XXXXXXX.pth` or `last_checkpoint`; on local
  paths they now go through a temporary file and a rename (`loco_det.utils.atomic_write`).
- fvcore's "unused keys" warning no longer lists BatchNorm's `num_batches_tracked` counters
  (converted torchvision weights carry them; FrozenBN has none; nothing is lost).
- Detectron2's Cityscapes loader uses a thread pool instead of forking a process pool (the
  forked workers could deadlock on a lock held at fork time).
- Warnings about Detectron2's own code (torch.jit.script deprecation, torch.meshgrid indexing)
  that say nothing about the user's run are silenced.

This module must be imported before the rest of loco_det's detection code; `loco_det.detection`
does so.
"""
import importlib.util
import os
import types
import warnings

from ..utils import LocoError


class Detectron2NotReady(LocoError, ImportError):
    """Detectron2 does not import here (tools print it as their one-line error)."""


def _check_detectron2():
    """Detectron2 imports as itself, else one line on how to fix the install."""
    try:
        import detectron2.engine  # noqa: F401
        import detectron2.evaluation  # noqa: F401
    except (ImportError, AttributeError) as e:
        raise Detectron2NotReady(
            f"Detectron2 does not import on this stack ({type(e).__name__}: {e}); "
            "`python tools/install_detectron2.py` installs the pinned v0.6 and applies its "
            "recorded patch for this stack (docs/troubleshooting.md)") from e
    return importlib.util.find_spec("detectron2._C") is not None


def _patch_checkpointer():
    from fvcore.common.checkpoint import Checkpointer

    from ..utils import atomic_write

    if getattr(Checkpointer, "_loco_det_atomic", False):
        return
    original_save = Checkpointer.save
    original_tag = Checkpointer.tag_last_checkpoint

    def save(self, name, **kwargs):
        """fvcore's save, written through a temporary file and a rename on local paths."""
        if not self.save_dir or not self.save_to_disk:
            return None
        if "://" in str(self.save_dir):
            return original_save(self, name, **kwargs)
        import torch

        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_write(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)
        return None

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in str(self.save_dir):
            return original_tag(self, last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)
        return None

    original_log = Checkpointer._log_incompatible_keys

    def _log_incompatible_keys(self, incompatible):
        """fvcore's warning, without BatchNorm's `num_batches_tracked` counters among the
        unused keys: a converted torchvision ResNet has them, Detectron2's FrozenBN has none,
        and nothing is lost by not loading a counter."""
        unexpected = [k for k in incompatible.unexpected_keys
                      if not k.endswith("num_batches_tracked")]
        return original_log(self, incompatible._replace(unexpected_keys=unexpected))

    Checkpointer.save = save
    Checkpointer.tag_last_checkpoint = tag_last_checkpoint
    Checkpointer._log_incompatible_keys = _log_incompatible_keys
    Checkpointer._loco_det_atomic = True


def _patch_cityscapes_pool():
    """Detectron2's Cityscapes loader forks a `multiprocessing.Pool` from a process that already
    runs threads and never closes it; under load the forked workers deadlocked here (a lock held
    at fork time) and the run hung. A thread pool has the same API, forks nothing, and the work
    (reading JSON/PNG files) runs in parallel enough."""
    import multiprocessing
    from multiprocessing.pool import ThreadPool

    from detectron2.data.datasets import cityscapes

    cityscapes.mp = types.SimpleNamespace(Pool=ThreadPool, cpu_count=multiprocessing.cpu_count)


def _quiet_warnings():
    # About Detectron2's code, not the user's run; they would bury the one-line errors.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.meshgrid: in an upcoming release.*",
                            category=UserWarning)
    # Detectron2's Cityscapes loader calls shapely's buffer(resolution=...)
    warnings.filterwarnings("ignore", message=r"The 'resolution' argument is deprecated",
                            category=DeprecationWarning)


_quiet_warnings()
HAS_COMPILED_OPS = _check_detectron2()
_patch_checkpointer()
_patch_cityscapes_pool()


def has_compiled_ops():
    """Whether this Detectron2 has its compiled ops (deformable conv, rotated boxes, fast
    COCOeval); the pure-Python install has none."""
    return HAS_COMPILED_OPS
