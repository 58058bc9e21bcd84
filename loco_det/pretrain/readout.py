"""Linear readout: how linearly separable are the frozen features of each encoder stage?

For every stage (res2..res5) the stage's output is globally average-pooled and a linear
classifier is trained on top of the frozen encoder (BN in eval mode); top-1 on the validation
split is reported per stage. Two protocols:

* "paper" (ImageNet-size data): the LoCo paper's protocol: random-resized-crop + flip
  augmentation recomputed every epoch, SGD without momentum, 100 epochs, lr 30 divided by 10 at
  epochs 30, 60 and 90, batch 256, no weight decay, raw pooled features (lr 30 was tuned for
  those; `feature_norm="bn"` adds a non-affine BatchNorm1d in front of each classifier).
* "small" (the embedded data, any set of up to 50,000 training images): without augmentation
  the features of an image never change, so they are computed once (resize + center crop) and
  the classifiers train on cached features for many cheap epochs. The features are
  standardised with the training set's per-dimension mean and std, which is what a BatchNorm1d
  in front of the classifier would converge to with fixed inputs; it makes one learning rate
  suit all four stages (whose raw scales differ by orders of magnitude) and a randomly
  initialised encoder alike. SGD with momentum 0.9, lr 0.1, cosine decay, 200 epochs, batch
  256, weight decay 5e-4 (a little regularisation: a few hundred images, up to 2048 dims).

`--protocol auto` picks "small" up to 50,000 training images, else "paper". The reported
number is the accuracy after the last epoch (no selection on the validation split).
"""
import contextlib
import math
import os

import numpy as np
import torch
import yaml
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from tqdm import tqdm

from ..fingerprint import random_init_fingerprint, readout_fingerprint
from ..records import RANDOM_METHOD, STAGES, ReadoutRecord
from ..stats import binomial_stderr
from ..utils import LocoError, check_output_dir, draw_seed
from .data import DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, find_images, load_rgb, mix_seed
from .model import ARCHS, NUM_STAGES, build_encoder, run_stage

STAGE_NAMES = STAGES
SMALL_MAX_IMAGES = 50_000

PROTOCOLS = {
    "paper": {"epochs": 100, "lr": 30.0, "momentum": 0.0, "weight_decay": 0.0,
              "lr_steps": [30, 60, 90], "schedule": "step", "batch_size": 256,
              "feature_norm": "none", "augment": True, "image_size": 224},
    "small": {"epochs": 200, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
              "lr_steps": [], "schedule": "cosine", "batch_size": 256,
              "feature_norm": "standardize", "augment": False, "image_size": 64},
}


class LabeledImages(torch.utils.data.Dataset):
    """ImageFolder-style (image, label). Labels follow `classes` (the training split's), so a
    validation split missing a class still gets the right indices. An unreadable file is an
    error naming it: skipping it would silently change the set the accuracy refers to."""

    def __init__(self, root, transform, classes=None):
        self.root = root
        samples, own = find_images(root)
        self.classes = classes or own
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(own) - set(index))
        if unknown:
            raise LocoError(f"{root}: classes {', '.join(unknown[:5])} are not in the training "
                            f"split")
        self.samples = [(path, index[own[label]]) for path, label in samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except DECODE_ERRORS as e:
            raise LocoError(f"{path}: cannot read image ({type(e).__name__})") from None
        return self.transform(img), label


def eval_transform(size):
    """ImageNet-style resize + center crop (224 -> resize 256 in the paper protocol; for small
    images resize to the crop size itself so as little as possible is cut away)."""
    resize = int(round(size / 0.875)) if size >= 128 else size
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(size):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def inference_setup(encoder, device):
    """The frozen encoder on `device` in eval mode; on CUDA laid out as pretraining runs it
    (channels_last, RUN.CHANNELS_LAST's default) with cuDNN autotuning for the fixed size."""
    encoder.to(device).eval()
    if device.type == "cuda":
        encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return encoder


@torch.no_grad()
def pooled_features(encoder, images):
    """Globally average-pooled output of each of the four stages, in float32. On CUDA the
    frozen encoder runs under bf16 autocast (as in pretraining): the paper protocol pushes
    100 epochs of ImageNet through it. Images take the layout of the encoder's weights
    (channels_last after `inference_setup` or in training)."""
    if encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last):
        images = images.contiguous(memory_format=torch.channels_last)
    feats, x = [], images
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if images.device.type == "cuda"
           else contextlib.nullcontext())
    with amp:
        for stage in range(NUM_STAGES):
            x = run_stage(encoder, stage, x)
            feats.append(x.float().mean(dim=(2, 3)))
    return feats


def read_checkpoint(path, take=None, prefix=None):
    """The encoder of any checkpoint the converter accepts, as a dict with `encoder` (a full
    torchvision state dict), `method`, `arch`, `config` (the pretraining recipe's YAML, or None),
    `fingerprint` and `source`.

    Why through the converter: a loco_det pretraining checkpoint is only one of the layouts a
    user brings (torchvision, timm, Lightning, solo-learn, DINO, ...; docs/checkpoints.md), and
    the readouts must find the encoder exactly where conversion for detection does, with the
    same `--take` / `--prefix` and the same refusals of ambiguous files. A loco_det checkpoint
    keeps its pretraining fingerprint and config (the readout's data and image size follow it);
    any other file is identified by its content hash and the encoder's place in it."""
    from .. import fingerprint
    from ..weights import layouts, resnet

    try:
        obj, _ = layouts.load_checkpoint(path)
    except LocoError as e:
        raise LocoError(f"{path}: cannot read checkpoint ({e})") from None
    if take is None and prefix is None and fingerprint.checkpoint_fingerprint(obj) \
            and isinstance(obj.get("encoder"), dict) and obj.get("arch") in ARCHS:
        return dict(obj, fingerprint=fingerprint.checkpoint_fingerprint(obj), source=None)
    state, _, info = layouts.extract_encoder(obj, path, prefix, take)
    depth = resnet.infer_resnet(state, path, info["arch_hint"])
    layouts.check_finite(state, path)
    arch = f"resnet{depth}"
    if arch not in ARCHS:
        raise LocoError(f"{path}: the encoder is a ResNet-{depth}; the readouts build "
                        f"{', '.join(ARCHS)}")
    full = build_encoder(arch).state_dict()   # the unused fc (and num_batches_tracked where
    full.update(state)                        # a file lacks it) stay as built
    sha256 = fingerprint.file_sha256(path)
    loco_fp = fingerprint.checkpoint_fingerprint(obj)
    return {"encoder": full, "method": info["method"] or "external", "arch": arch,
            "config": obj["config"] if loco_fp else None,
            "fingerprint": loco_fp or fingerprint.file_fingerprint(sha256, info["prefix"]),
            "source": {"layout": info["layout"], "prefix": info["prefix"],
                       "chosen_by": info["reason"], "sha256": sha256}}


def load_encoder(ckpt=None, arch=None, seed=None, path=None):
    """(encoder, method, arch): a loaded checkpoint's encoder, or a random init of `arch`.

    The random init draws exactly as pretraining does (seed, then the encoder first), so seed
    S gives the initial encoder of the pretraining run with SEED=S: "before vs after"."""
    if ckpt is None:
        if arch not in ARCHS:
            raise LocoError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
        torch.manual_seed(seed)
        return build_encoder(arch), RANDOM_METHOD, arch
    if arch is not None and arch != ckpt["arch"]:
        raise LocoError(f"{path}: checkpoint is {ckpt['arch']}, --arch says {arch}")
    encoder = build_encoder(ckpt["arch"])
    encoder.load_state_dict(ckpt["encoder"], strict=True)
    return encoder, ckpt["method"], ckpt["arch"]


def make_loader(dataset, batch_size, shuffle, workers, seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, generator=g,
                                       pin_memory=torch.cuda.is_available())


def extract(encoder, loader, device, desc, progress):
    feats = [[] for _ in range(NUM_STAGES)]
    labels = []
    for images, y in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        for k, f in enumerate(pooled_features(encoder, images.to(device, non_blocking=True))):
            feats[k].append(f.cpu())
        labels.append(y)
    return [torch.cat(f) for f in feats], torch.cat(labels)


def lr_at(protocol, epoch_float):
    """Learning rate at a (fractional) epoch: steps at lr_steps, or cosine to 0."""
    lr = protocol["lr"]
    if protocol["schedule"] == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * epoch_float / protocol["epochs"]))
    return lr * 0.1 ** sum(epoch_float >= s for s in protocol["lr_steps"])


def make_heads(dims, num_classes, feature_norm):
    heads = []
    for d in dims:
        linear = nn.Linear(d, num_classes)
        nn.init.normal_(linear.weight, std=0.01)  # MoCo / SimCLR linear-eval init
        nn.init.zeros_(linear.bias)
        heads.append(nn.Sequential(nn.BatchNorm1d(d, affine=False), linear)
                     if feature_norm == "bn" else linear)
    return nn.ModuleList(heads)


def accuracy(heads, feats, labels):
    heads.eval()
    with torch.no_grad():
        return [100.0 * (head(f).argmax(1) == labels).float().mean().item()
                for head, f in zip(heads, feats)]


def fit_cached(train_feats, train_y, val_feats, val_y, num_classes, protocol, seed, progress):
    """Train the four heads on cached features; returns top-1 per stage on val.

    Runs on one thread: the matrices are tiny, and extra threads only cost synchronisation
    (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_cached(train_feats, train_y, val_feats, val_y, num_classes, protocol, seed,
                           progress)
    finally:
        torch.set_num_threads(threads)


def _fit_cached(train_feats, train_y, val_feats, val_y, num_classes, protocol, seed, progress):
    if protocol["feature_norm"] == "standardize":
        stats = [(f.mean(0), f.std(0).clamp_min(1e-6)) for f in train_feats]
        train_feats = [(f - m) / s for f, (m, s) in zip(train_feats, stats)]
        val_feats = [(f - m) / s for f, (m, s) in zip(val_feats, stats)]
    torch.manual_seed(seed)
    heads = make_heads([f.shape[1] for f in train_feats], num_classes, protocol["feature_norm"])
    opt = torch.optim.SGD(heads.parameters(), lr=protocol["lr"], momentum=protocol["momentum"],
                          weight_decay=protocol["weight_decay"])
    n, bs = len(train_y), protocol["batch_size"]
    steps = max(1, math.ceil(n / bs))
    g = torch.Generator()
    g.manual_seed(seed)
    bar = tqdm(range(protocol["epochs"]), desc="linear heads", disable=not progress,
               dynamic_ncols=True)
    for epoch in bar:
        heads.train()
        order = torch.randperm(n, generator=g)
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(protocol, epoch + i / steps)
            idx = order[i * bs:(i + 1) * bs]
            loss = sum(F.cross_entropy(head(f[idx]), train_y[idx])
                       for head, f in zip(heads, train_feats))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item() / NUM_STAGES:.3f}", refresh=False)
    return accuracy(heads, val_feats, val_y)


def fit_online(encoder, train_set, val_loader, num_classes, protocol, device, workers, seed,
               progress):
    """Paper protocol: augmented images every epoch through the frozen encoder."""
    dims = [f.shape[1] for f in pooled_features(encoder, torch.zeros(2, 3, 64, 64,
                                                                     device=device))]
    torch.manual_seed(seed)
    heads = make_heads(dims, num_classes, protocol["feature_norm"]).to(device)
    opt = torch.optim.SGD(heads.parameters(), lr=protocol["lr"], momentum=protocol["momentum"],
                          weight_decay=protocol["weight_decay"])
    loader = make_loader(train_set, protocol["batch_size"], True, workers, seed)
    for epoch in range(protocol["epochs"]):
        heads.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(protocol, epoch)
        bar = tqdm(loader, desc=f"readout epoch {epoch + 1}/{protocol['epochs']}",
                   disable=not progress, dynamic_ncols=True)
        for images, y in bar:
            feats = pooled_features(encoder, images.to(device, non_blocking=True))
            y = y.to(device)
            loss = sum(F.cross_entropy(head(f), y) for head, f in zip(heads, feats))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item() / NUM_STAGES:.3f}", refresh=False)
    val_feats, val_y = extract(encoder, val_loader, device, "val features", progress)
    return accuracy(heads.cpu(), val_feats, val_y)


def default_data_dir(checkpoint_cfg_root=None):
    """The split root (with train/ and val/): next to the pretraining DATA.ROOT when that is a
    train/ folder with a val/ sibling, else the embedded data's imagefolder/."""
    if checkpoint_cfg_root:
        parent = os.path.dirname(os.path.normpath(checkpoint_cfg_root))
        if os.path.isdir(os.path.join(parent, "train")) and os.path.isdir(
                os.path.join(parent, "val")):
            return parent
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "loco_synth",
                        "imagefolder")


# Flag -> (check, what it must be). Values of None (not given) are not checked.
_OVERRIDE_RULES = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a positive number"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "zero or positive"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "image_size": (lambda v: v >= 32, "at least 32 (a ResNet halves it 5 times)"),
}


def check_arguments(output_dir, checkpoint, overrides, workers):
    """Every check of the command line that needs no data, before anything is read or written:
    numeric flags in range, --output-dir usable and not holding a finished readout, and
    --checkpoint a pretraining checkpoint rather than converted Detectron2 weights."""
    for key, value in (overrides or {}).items():
        if value is not None and key in _OVERRIDE_RULES and not _OVERRIDE_RULES[key][0](value):
            raise LocoError(f"--{key.replace('_', '-')} {value}: must be "
                            f"{_OVERRIDE_RULES[key][1]}")
    if workers is not None and workers < 0:
        raise LocoError(f"--workers {workers}: must be zero or positive")
    check_output_dir(output_dir)
    done = os.path.join(output_dir, "readout.json")
    if os.path.exists(done):
        raise LocoError(f"--output-dir {output_dir} already holds a finished readout ({done}); "
                        "choose another --output-dir (or move that one away)")
    if checkpoint is not None:
        if os.path.isdir(checkpoint):
            raise LocoError(f"--checkpoint {checkpoint} is a directory; give its "
                            "checkpoint_last.pth")
        if os.path.isfile(checkpoint) and _is_plain_pickle(checkpoint):
            raise LocoError(f"--checkpoint {checkpoint} is a plain pickle (converted Detectron2 "
                            "weights, .pkl), not a pretraining checkpoint: give the "
                            "checkpoint_last.pth it was converted from")


def _is_plain_pickle(path):
    """torch.save writes a zip archive; a converted .pkl is a bare pickle stream (0x80 ...)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    return head == b"\x80" and not zipfile.is_zipfile(path)


def run_readout(output_dir, checkpoint=None, arch=None, data_dir=None, protocol="auto",
                overrides=None, workers=2, seed=-1, progress=True, device=None, take=None,
                prefix=None):
    """Read out every stage; write output_dir/readout.json (docs/formats.md) and return it.
    `take` / `prefix` pick the encoder in a checkpoint holding several (`read_checkpoint`)."""
    check_arguments(output_dir, checkpoint, overrides, workers)
    if seed is None or seed < 0:
        seed = draw_seed()
    ckpt, pre_cfg, source = None, {}, None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint, take, prefix)
        pre_cfg = yaml.safe_load(ckpt["config"]) if ckpt["config"] else {}
        source = ckpt["source"]
    encoder, method, arch = load_encoder(ckpt, arch, seed, checkpoint)
    ckpt_fp = random_init_fingerprint(arch) if ckpt is None else ckpt["fingerprint"]
    del ckpt
    data_dir = data_dir or default_data_dir(pre_cfg.get("DATA", {}).get("ROOT"))
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    train_samples, classes = find_images(train_dir)  # clear errors for a missing split
    n_train = len(train_samples)
    find_images(val_dir)
    if protocol == "auto":
        protocol = "small" if n_train <= SMALL_MAX_IMAGES else "paper"
    if protocol not in PROTOCOLS:
        raise LocoError(f"--protocol {protocol!r}: choose auto, small or paper")
    proto = dict(PROTOCOLS[protocol])
    if "IMAGE_SIZE" in pre_cfg.get("DATA", {}):
        proto["image_size"] = pre_cfg["DATA"]["IMAGE_SIZE"]  # read out at the trained scale
    proto.update({k: v for k, v in (overrides or {}).items() if v is not None})
    size = proto["image_size"]
    if proto["augment"] and proto["feature_norm"] == "standardize":
        raise LocoError("--feature-norm standardize needs cached features (--protocol small); "
                        "use bn with augmentation")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inference_setup(encoder, device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    val_set = LabeledImages(val_dir, eval_transform(size), classes)
    val_loader = make_loader(val_set, 256, False, workers, seed)
    if protocol == "small" or not proto["augment"]:
        train_set = LabeledImages(train_dir, eval_transform(size), classes)
        train_feats, train_y = extract(encoder, make_loader(train_set, 256, False, workers, seed),
                                       device, "train features", progress)
        val_feats, val_y = extract(encoder, val_loader, device, "val features", progress)
        top1 = fit_cached(train_feats, train_y, val_feats, val_y, len(train_set.classes), proto,
                          mix_seed(seed, 1), progress)
    else:
        train_set = LabeledImages(train_dir, train_transform(size), classes)
        top1 = fit_online(encoder, train_set, val_loader, len(train_set.classes), proto, device,
                          workers, mix_seed(seed, 1), progress)
    record = ReadoutRecord(
        checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
        method=method, arch=arch,
        top1=dict(zip(STAGE_NAMES, top1)),
        # Binomial standard error of each top-1 (percentage points): with 100 validation
        # images a difference of a few points is noise.
        top1_stderr={s: binomial_stderr(a, len(val_set)) for s, a in zip(STAGE_NAMES, top1)},
        protocol={"name": protocol, **proto, "train_images": len(train_set),
                  "val_images": len(val_set), "seed": seed, "data_dir": data_dir,
                  "classes": len(train_set.classes),
                  "majority_val_top1": majority_top1(val_set)},
        checkpoint_fingerprint=ckpt_fp,
        checkpoint_seed=pre_cfg.get("SEED"),
        checkpoint_source=source)
    record.fingerprint = readout_fingerprint(record.protocol, ckpt_fp)
    os.makedirs(output_dir, exist_ok=True)
    record.write(output_dir)
    return record.to_json()


def majority_top1(dataset):
    """Accuracy of always answering the most frequent validation class: the floor to beat."""
    counts = np.bincount([label for _, label in dataset.samples])
    return 100.0 * counts.max() / counts.sum()
