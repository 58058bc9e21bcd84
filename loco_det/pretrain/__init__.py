"""Pretraining of torchvision ResNets by a learning rule: SimCLR (e2e), GIM, LoCo, supervised,
loco_overlap2, loco_blocks, or a rule of your own (rules.py).

Public API (documented in docs/pretraining.md, "Python API"; other code builds on these names):

    build_model(method, arch, **decoder_options)  nn.Module with .encoder and .forward_backward
    rules.Rule / rules.Unit / rules.load_rule     learning rules as data, the plug-in API
    get_cfg() / load_config(path, overrides)      the pretraining config (see config.py)
    train(cfg, output_dir, resume=False)          the training loop (see engine.py)
"""
from .config import get_cfg, load_config  # noqa: F401
from .engine import train  # noqa: F401
from .model import build_model  # noqa: F401
