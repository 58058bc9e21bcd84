"""Self-supervised pretraining of torchvision ResNets with SimCLR (e2e), GIM or LoCo.

Public API (documented in the README; other code builds on these names):

    build_model(method, arch, **decoder_options)  nn.Module with .encoder and .forward_backward
    get_cfg() / load_config(path, overrides)      the pretraining config (see config.py)
    train(cfg, output_dir, resume=False)          the training loop (see engine.py)
"""
from .config import get_cfg, load_config  # noqa: F401
from .engine import train  # noqa: F401
from .model import build_model  # noqa: F401
