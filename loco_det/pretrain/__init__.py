"""Pretraining of torchvision ResNets by a learning rule: SimCLR (e2e), GIM, LoCo, supervised,
loco_overlap2, loco_blocks, or a rule of your own (rules.py).

Public API (documented in docs/pretraining.md, "Python API"; other code builds on these names):

    build_model(method, arch, **decoder_options)  nn.Module with .encoder and .forward_backward
    rules.Rule / rules.Unit / rules.load_rule     learning rules as data, the plug-in API
    get_cfg() / load_config(path, overrides)      the pretraining config (see config.py)
    train(cfg, output_dir, resume=False)          the training loop (see engine.py)
"""
import importlib

# PEP 562: the names above are imported on first use, so that `loco_det.pretrain.rules` (which
# the report reads) comes without torch and the training loop.
_EXPORTS = {"get_cfg": "config", "load_config": "config", "train": "engine",
            "build_model": "model"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
