"""loco_det: benchmark suite for local contrastive learning (LoCo, GIM, SimCLR) with Detectron2.

`import loco_det` is light: Detectron2 is imported only by `loco_det.detection` (also reached as
the attribute `loco_det.detection`), which registers loco_det's Detectron2 components and
datasets, so a saved Detectron2 `config.yaml` plus weights reloads anywhere `import
loco_det.detection` has run.
"""
import importlib

__version__ = "0.1.0"

# The torchvision ResNets every tool supports: pretraining, both readouts, conversion (whose
# layout table loco_det.weights.resnet keeps in step with this list).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def __getattr__(name):
    # PEP 562: `loco_det.detection` (and other subpackages) imported on first use, so tools that
    # need no Detectron2 (report, benchmark --dry-run, make_coco_subset) never load it.
    if name in ("detection", "pretrain"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
