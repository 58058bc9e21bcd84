"""Make the pure-Python Detectron2 v0.6 importable and say clearly what it cannot do.

The PyPI sdist we install has no compiled `detectron2._C`, which v0.6 imports eagerly, and it
uses `PIL.Image.LINEAR` (removed in Pillow 10) as an import-time default. This module must be
imported before anything from detectron2; `loco_det.detection` does so. With an upstream source
install (real `_C`), nothing is replaced.
"""
import importlib
import sys
import types
import warnings

from PIL import Image


class CompiledOpsMissing(RuntimeError):
    pass


def _patch_pillow():
    # Only fills the gap left by Pillow 10; LINEAR was always an alias of BILINEAR.
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


class _MissingCompiledOps(types.ModuleType):
    """Stands in for detectron2._C: importing works, using any op fails with one clear line."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise CompiledOpsMissing(
            f"detectron2._C.{name} is a compiled Detectron2 op, and this Detectron2 install has no "
            "compiled ops (deformable conv, rotated boxes and the fast C++ COCO evaluation need them); "
            "install Detectron2 from source to use it")


def _install_c_stub():
    try:
        importlib.import_module("detectron2._C")
        return True
    except ImportError:
        stub = _MissingCompiledOps("detectron2._C")
        stub.__file__ = None
        stub.LOCO_DET_STUB = True
        sys.modules["detectron2._C"] = stub
        import detectron2

        detectron2._C = stub
        return False


_patch_pillow()
# Detectron2 v0.6 decorates a few helpers with torch.jit.script at import time; torch >= 2.10
# warns about the deprecation on every import. It concerns Detectron2's code, not the user's.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
HAS_COMPILED_OPS = _install_c_stub()


def has_compiled_ops():
    return HAS_COMPILED_OPS
