"""Detectron2 integration. `compat` must be imported before anything from detectron2."""
from . import compat  # noqa: F401
