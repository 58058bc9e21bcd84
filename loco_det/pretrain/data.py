"""Pretraining data: an ImageFolder-style dataset, SimCLR's two-view augmentation, a sampler.

Exact resume and world-size independence drive the design:

* Augmentations draw from a generator seeded by (run seed, epoch, image index) inside
  `__getitem__`, not from each worker's global RNG. A sample's two views are then the same
  whichever process, worker or restart produced them.
* `ResumableDistributedSampler` shuffles with (seed, epoch), cuts the permutation into global
  batches and hands each rank a contiguous slice of each global batch. The global batches are
  thus identical for any world size, and a run can resume in the middle of an epoch by skipping
  batches without decoding them.
* The augmentation itself is loco_det/pretrain/augment.py; loader batches are uint8 and are
  normalised on the training device (docs/pretraining-input.md).

Unreadable images are found lazily (checking 1.28M ImageNet files up front would take longer
than an epoch on many file systems): a failing file is replaced by the next readable one, its
index is reported back with the batch, and the engine counts them, warns once with the path and
fails once more than DATA.MAX_BAD_FRACTION of the dataset is known to be bad.
"""
import os
import random

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from ..utils import LocoError
from .augment import MEAN, STD, SimCLRCrop, SimCLRView, blur_kernel_size, decode_uint8

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# torchvision's ImageNet normalisation: the converted weights declare the same mean/std to
# Detectron2 (docs/benchmarks.md), so pretraining must use it too.
IMAGENET_MEAN, IMAGENET_STD = MEAN, STD
# Errors PIL raises for truncated, corrupt or non-image files (UnidentifiedImageError is an
# OSError; some broken PNG chunks raise SyntaxError or ValueError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# Set to 1 to let a dataset walk follow directory links that lead outside the data root (e.g.
# class folders linked in from another disk); by default such a link is an error.
FOLLOW_LINKS_ENV = "LOCO_DET_DATA_FOLLOW_LINKS"


def find_images(root, max_images=0):
    """(samples, classes) of an ImageFolder-style `root`: root/<class>/**/<image>.

    Raises LocoError naming `root` when it is missing or holds no images. Directory links are
    followed only while they stay inside `root` (or anywhere with LOCO_DET_DATA_FOLLOW_LINKS=1),
    and a link back to a folder already walked (a loop) is one error line naming it: a crafted
    data folder cannot make the walk endless or roam the file system."""
    if not os.path.isdir(root):
        raise LocoError(f"{root}: data directory not found (expected ROOT/<class>/<image>)")
    follow_outside = os.environ.get(FOLLOW_LINKS_ENV, "") == "1"
    real_root = os.path.realpath(root)
    visited = {real_root}

    def enter(path):
        """Record directory `path` (a class folder or a subfolder) as walked, or refuse it."""
        real = os.path.realpath(path)
        if real in visited:
            raise LocoError(f"{root}: {path} leads back to {real}, which the walk already "
                            "visited (a symbolic link loop); remove the link")
        inside = real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
        if not inside and not follow_outside:
            raise LocoError(f"{root}: {path} is a link to {real}, outside the data root; set "
                            f"{FOLLOW_LINKS_ENV}=1 to follow links out of it")
        visited.add(real)

    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples = []
    for label, cls in enumerate(classes):
        top = os.path.join(root, cls)
        enter(top)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames.sort()
            for d in dirnames:
                enter(os.path.join(dirpath, d))
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    samples.append((os.path.join(dirpath, name), label))
    if not samples:
        raise LocoError(f"{root}: no images found (expected ROOT/<class>/<image> with extensions "
                        f"{', '.join(IMG_EXTENSIONS)})")
    if max_images and max_images < len(samples):
        # Evenly spaced rather than the first N, so every class keeps its share.
        keep = np.linspace(0, len(samples) - 1, max_images).round().astype(int)
        samples = [samples[i] for i in keep]
    return samples, classes


def load_rgb(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def simclr_transform(cfg):
    """One view of SimCLR's augmentation (apply twice for a pair) as torchvision's plain
    composition on PIL images: the reference that the fast path of loco_det/pretrain/augment.py
    (which training uses) is tested and measured against.

    Colour jitter with strength s: brightness, contrast, saturation 0.8 s and hue 0.2 s, applied
    with DATA.COLOR_JITTER_PROB; grayscale DATA.GRAYSCALE_PROB; Gaussian blur with a kernel of
    ~10% of the crop (so it scales down to 64 px crops) and sigma in [0.1, 2.0]."""
    d = cfg.DATA
    s = d.COLOR_JITTER
    return transforms.Compose([
        transforms.RandomResizedCrop(d.IMAGE_SIZE, scale=tuple(d.CROP_SCALE),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)],
                               p=d.COLOR_JITTER_PROB),
        transforms.RandomGrayscale(p=d.GRAYSCALE_PROB),
        transforms.RandomApply([transforms.GaussianBlur(blur_kernel_size(d.IMAGE_SIZE),
                                                        sigma=(0.1, 2.0))], p=d.BLUR_PROB),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def mix_seed(*keys):
    """A well-mixed 63-bit seed from non-negative ints (e.g. run seed, epoch, image index)."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class TwoViewDataset(torch.utils.data.Dataset):
    """ImageFolder-style dataset yielding (view1, view2, label, bad_index).

    Indexed by (epoch, index) pairs from `ResumableDistributedSampler` (a plain int means
    epoch 0). `bad_index` is -1, or the index of the first unreadable file that was replaced by
    the next readable one for this sample; the engine aggregates these."""

    def __init__(self, root, transform, seed, max_images=0):
        self.root = root
        self.samples, self.classes = find_images(root, max_images)
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def path(self, index):
        return self.samples[index][0]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad = -1
        # the fast paths decode to a uint8 tensor once for both views
        load = decode_uint8 if getattr(self.transform, "uint8_input", False) else load_rgb
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                img = load(self.samples[i][0])
            except DECODE_ERRORS:
                if bad < 0:
                    bad = i
                continue
            break
        else:
            raise LocoError(f"{self.root}: no image in the dataset can be read")
        # fork_rng keeps the process-wide generator untouched (with NUM_WORKERS=0 it is the
        # training process's own).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            v1 = self.transform(img)
            v2 = self.transform(img)
        # The label of the image actually returned (a replacement's own, not the bad file's).
        return v1, v2, self.samples[i][1], bad


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """Seeded, per-epoch shuffled sampler over whole global batches, resumable mid-epoch.

    Does DistributedSampler's job (disjoint shards per rank, `set_epoch`) with two differences:
    the tail that does not fill a global batch is dropped (contrastive losses want full
    batches), and rank r gets positions [r*b, (r+1)*b) of every global batch of size W*b, so
    the global batches do not depend on the world size. `set_epoch(epoch, start_batch)` skips
    the first `start_batch` batches of the epoch. Yields (epoch, index) pairs."""

    def __init__(self, dataset_len, global_batch, rank, world_size, seed, shuffle=True):
        if global_batch % world_size:
            raise ValueError("global batch must divide by the world size")
        self.n = dataset_len
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self):
        return self.n // self.global_batch

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.local_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.local_batch
            for i in order[start:start + self.local_batch]:
                yield self.epoch, i


def seed_worker(worker_id):
    """Seed `random` and numpy in each loader worker from torch's per-worker seed (itself
    derived from the loader's seeded generator), so nothing in a worker is left unseeded."""
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_loader(cfg, rank, world_size, seed):
    """(dataset, sampler, loader) for pretraining; validates the data directory first."""
    if cfg.DATA.AUGMENT_DEVICE == "cuda" and not torch.cuda.is_available():
        raise LocoError("DATA.AUGMENT_DEVICE=cuda: CUDA is not available on this machine")
    transform = (SimCLRView if cfg.DATA.AUGMENT_DEVICE == "cpu" else SimCLRCrop)(cfg.DATA)
    dataset = TwoViewDataset(cfg.DATA.ROOT, transform, seed, cfg.DATA.MAX_IMAGES)
    if len(dataset) < cfg.OPTIM.BATCH_SIZE:
        raise LocoError(f"{cfg.DATA.ROOT}: {len(dataset)} images, fewer than one global batch "
                        f"(OPTIM.BATCH_SIZE={cfg.OPTIM.BATCH_SIZE})")
    sampler = ResumableDistributedSampler(len(dataset), cfg.OPTIM.BATCH_SIZE, rank, world_size,
                                          seed)
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    workers = cfg.DATA.NUM_WORKERS
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=seed_worker,
        generator=generator, persistent_workers=workers > 0,
        prefetch_factor=cfg.DATA.PREFETCH_FACTOR if workers > 0 else None)
    return dataset, sampler, loader
