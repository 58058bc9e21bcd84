"""loco_det: benchmark suite for local contrastive learning (LoCo, GIM, SimCLR) with Detectron2.

Importing the package registers loco_det's Detectron2 components and datasets, so a saved
Detectron2 `config.yaml` plus weights reloads anywhere `import loco_det` has run.
"""
__version__ = "0.1.0"

from . import detection  # noqa: F401,E402  (registration side effects)
