"""The random-initialisation baseline, in one place: what the grid sets for it and what a
Detectron2 run accepts.

Random init means what it says. On a fine-tuning config (FREEZE_AT < 5) the whole backbone trains
from scratch: FREEZE_AT 0, with a norm that can be trained from scratch (the config's if it
trains, else SyncBN; BN in one process), as in He et al., "Rethinking ImageNet Pre-training". A
frozen readout config (FREEZE_AT >= 5) stays frozen: that is what readout means. Anything between
keeps random stages fixed behind identity FrozenBN, which is no baseline.

Plain values in, plain values out: no Detectron2 import, so the grid can ask without one.
"""

TRAINABLE_NORMS = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "GN")


def random_init_overrides(freeze_at, norm):
    """The config overrides (a flat KEY, VALUE list) that make a config with MODEL.BACKBONE.
    FREEZE_AT `freeze_at` and MODEL.RESNETS.NORM `norm` a random-init baseline."""
    if int(freeze_at) >= 5:
        return []
    return ["MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.NORM",
            norm if norm in TRAINABLE_NORMS else "SyncBN"]


def random_init_problem(freeze_at, norm):
    """Why a random-init run with this FREEZE_AT and norm is no baseline, or None."""
    freeze_at = int(freeze_at)
    if 0 < freeze_at < 5:
        return (f"LOCO_DET.FROM_SCRATCH with MODEL.BACKBONE.FREEZE_AT {freeze_at} keeps "
                f"random stages frozen: set FREEZE_AT 0 and MODEL.RESNETS.NORM SyncBN (or "
                f"BN) to train the backbone from scratch, or FREEZE_AT 5 for the frozen "
                f"readout baseline")
    if freeze_at == 0 and norm not in TRAINABLE_NORMS:
        return (f"LOCO_DET.FROM_SCRATCH with FREEZE_AT 0 needs a norm that trains from "
                f"scratch; MODEL.RESNETS.NORM is {norm!r}: use SyncBN or BN")
    return None
