"""Make the pure-Python Detectron2 v0.6 work on this stack, for loco_det and for any plain
Detectron2 code run after `import loco_det.detection`, and say clearly what it cannot do.

Each fix applies only where the installed stack actually lacks the thing (with an upstream
source install, real `_C`, an old numpy or a setuptools with pkg_resources, it is a no-op):

- `detectron2._C` (compiled ops) missing: a stand-in module whose every op fails with one line
  (`CompiledOpsMissing`); deformable conv and rotated boxes need the real thing. The build
  queries of `collect_env_info` (hence `default_setup`) answer "none" instead of failing.
- COCO evaluation: `COCOEvaluator(use_fast_impl=True)` (its default) and
  `evaluate_predictions_on_coco` use the C++ `COCOeval_opt`; without compiled ops that name
  becomes pycocotools' own `COCOeval` (the official Python path), with a one-time notice.
- numpy >= 1.24 removed `np.bool`, `np.int`, `np.float`, `np.object`, `np.str`, which Detectron2
  v0.6 uses on its training path (`PolygonMasks.nonempty`, the class histogram). They were
  always the builtins, so the aliases change nothing else.
- Pillow >= 10 removed `Image.LINEAR` (an import-time default in Detectron2's transforms); it
  was always `Image.BILINEAR`.
- setuptools >= 81 has no `pkg_resources`, which `detectron2.model_zoo` imports for
  `resource_filename` only; a minimal module providing that (from `importlib.resources`, plus a
  no-op `fixup_namespace_packages` for tools such as pytest) is registered when the real one is
  absent.
- Checkpoints: fvcore's `Checkpointer.save` / `tag_last_checkpoint` write the real file name
  directly, so a kill leaves a truncated `model_XXXXXXX.pth` or `last_checkpoint`; on local
  paths they now go through a temporary file and a rename (`loco_det.utils.atomic_write`).
- fvcore's "unused keys" warning no longer lists BatchNorm's `num_batches_tracked` counters
  (converted torchvision weights carry them; FrozenBN has none; nothing is lost).
- Detectron2's Cityscapes loader uses a thread pool instead of forking a process pool (the
  forked workers could deadlock on a lock held at fork time).
- Warnings about Detectron2's own code (torch.jit.script deprecation, torch.meshgrid indexing)
  that say nothing about the user's run are silenced.

This module must be imported before anything from detectron2; `loco_det.detection` does so.
"""
import importlib
import logging
import os
import sys
import types
import warnings

from PIL import Image


class CompiledOpsMissing(RuntimeError):
    pass


def _patch_pillow():
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _patch_numpy():
    import numpy as np

    for name, value in (("bool", bool), ("int", int), ("float", float), ("object", object),
                        ("str", str)):
        if name not in np.__dict__:
            setattr(np, name, value)


def _resource_filename(package, resource):
    """pkg_resources.resource_filename for a package installed as plain files."""
    from importlib.resources import files

    return os.fspath(files(package).joinpath(resource))


def _patch_pkg_resources():
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.__doc__ = ("loco_det's stand-in for setuptools' removed pkg_resources: only "
                        "resource_filename (what detectron2.model_zoo needs)")
        stub.resource_filename = _resource_filename
        # Tools that see a pkg_resources module call this (pytest's monkeypatch.syspath_prepend
        # does); without setuptools, namespace packages are native (PEP 420): nothing to fix up.
        stub.fixup_namespace_packages = lambda path_item, parent=None: None
        stub.LOCO_DET_STUB = True
        sys.modules["pkg_resources"] = stub


class _MissingCompiledOps(types.ModuleType):
    """Stands in for detectron2._C: importing works, using any op fails with one clear line."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise CompiledOpsMissing(
            f"detectron2._C.{name} is a compiled Detectron2 op, and this Detectron2 install has no "
            "compiled ops (deformable conv and rotated boxes need them); "
            "install Detectron2 from source to use it")


def _install_c_stub():
    try:
        importlib.import_module("detectron2._C")
        return True
    except ImportError:
        stub = _MissingCompiledOps("detectron2._C")
        stub.__file__ = None
        stub.LOCO_DET_STUB = True
        # What `collect_env_info` (called by `default_setup`) asks the build about.
        stub.get_compiler_version = lambda: "none (Detectron2 installed without compiled ops)"
        stub.get_cuda_version = lambda: "none (Detectron2 installed without compiled ops)"
        stub.has_cuda = lambda: False
        sys.modules["detectron2._C"] = stub
        import detectron2

        detectron2._C = stub
        return False


_notice_given = []


def _patch_coco_eval():
    """Without compiled ops, Detectron2's fast COCOeval becomes pycocotools' COCOeval."""
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import coco_evaluation

    class PythonCOCOeval(COCOeval):
        """pycocotools' COCOeval, standing in for Detectron2's C++ COCOeval_opt."""

        def __init__(self, *args, **kwargs):
            if not _notice_given:
                _notice_given.append(True)
                logging.getLogger("loco_det.detection").warning(
                    "COCO evaluation uses pycocotools' Python COCOeval (the official one): this "
                    "Detectron2 has no compiled ops for its fast C++ version (use_fast_impl)")
            super().__init__(*args, **kwargs)

    coco_evaluation.COCOeval_opt = PythonCOCOeval


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


_patch_pillow()
_patch_numpy()
_patch_pkg_resources()
_quiet_warnings()
HAS_COMPILED_OPS = _install_c_stub()
if not HAS_COMPILED_OPS:
    _patch_coco_eval()
_patch_checkpointer()
_patch_cityscapes_pool()


def has_compiled_ops():
    return HAS_COMPILED_OPS
