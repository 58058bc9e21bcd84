"""Detectron2 integration. `compat` must be imported before anything from detectron2.

Importing this package registers loco_det's components (ROI heads, ...) and its datasets
(embedded data, COCO subsets) by name, so saved configs naming them build anywhere.
"""
from . import compat  # noqa: F401  (must precede every detectron2 import)
from . import components  # noqa: F401,E402  (registers components)
from .datasets import register_all  # noqa: E402

register_all()
