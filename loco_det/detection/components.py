"""Detectron2 components loco_det's configs name, registered when this module is imported.

`import loco_det.detection` imports this module, so a saved config.yaml that names one of these
components builds wherever that import has run (registration is by name in Detectron2's
registries).

Also: a one-line error for configs that ask for operations only Detectron2's compiled ops
provide, instead of a failure deep inside the first forward pass.
"""
from . import compat  # noqa: F401  (must precede every detectron2 import)
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

from ..utils import ConfigError, get_dotted


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with a norm layer after the res5 stage (MoCo's detection protocol).

    Self-supervised backbones are trained with BN and their res5 features are not scaled like
    the supervised, frozen-BN features Detectron2's C4 head expects; MoCo adds this normalisation
    (of type MODEL.RESNETS.NORM, i.e. SyncBN in the protocol) so that its published numbers are
    reproducible. The layer is named `res5.norm`, as in MoCo's code, so MoCo checkpoints load.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


# Registered only once: a user who already registered MoCo's own class under this name keeps it
# (same architecture and parameter names), and re-importing this module does not fail.
if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


_ROTATED = {
    "MODEL.PROPOSAL_GENERATOR.NAME": ("RRPN",),
    "MODEL.ROI_HEADS.NAME": ("RROIHeads",),
    "MODEL.ANCHOR_GENERATOR.NAME": ("RotatedAnchorGenerator",),
}


def check_compiled_ops(cfg):
    """Refuse, in one line, a config that needs Detectron2's compiled ops when they are absent.

    Without this, deformable conv or rotated boxes fail at the first forward pass with an error
    from the stubbed `detectron2._C`, after data loading and model building have taken minutes.
    """
    if compat.has_compiled_ops():
        return
    needs = []
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        needs.append("deformable conv (MODEL.RESNETS.DEFORM_ON_PER_STAGE)")
    for key, names in _ROTATED.items():
        if get_dotted(cfg, key) in names:
            needs.append(f"rotated boxes ({key} {get_dotted(cfg, key)})")
    if needs:
        raise ConfigError(
            f"the config asks for {', '.join(needs)}, which needs Detectron2's compiled ops "
            "(detectron2._C), and this Detectron2 install has none; install Detectron2 from "
            "source or change the config")
