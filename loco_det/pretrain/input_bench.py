"""Input-pipeline measurement: CPU time per source image of each way of making SimCLR's two views.

Rows, all measured on the same images in the same run, interleaved image by image so that a
busy machine slows every row alike:

* reference  - `data.simclr_transform`, torchvision's composition on PIL (the pipeline before
  the fast path);
* cpu        - what a loader worker does with DATA.AUGMENT_DEVICE=cpu (`augment.SimCLRView`);
* cuda (CPU part) - what a worker does with DATA.AUGMENT_DEVICE=cuda: decode, crop, flip
  (`augment.SimCLRCrop`); the rest runs on the GPU;
* decode     - reading and decoding the file alone, with PIL as the reference does and with
  `augment.decode_uint8` as the fast paths do (the same pixels): the ceiling of any CPU
  pipeline.

Each row includes reading and decoding the file. The clock is the process's CPU time with one
torch thread, so "images/s per core" is what one loader worker sustains, independent of other
processes competing for the machine.

Images: `--images DIR` (e.g. one ImageNet class folder), else the two photos scikit-learn ships
(china.jpg, flower.jpg, 640x427) when it is installed, else `make_jpegs`: generated, deterministic
500x375 JPEGs (ImageNet's typical size) described in its docstring.
"""
import glob
import os
import time

import numpy as np
import torch
from PIL import Image

from .augment import SimCLRCrop, SimCLRView, decode_uint8
from .data import load_rgb, simclr_transform


def synthetic_photo(width, height, seed):
    """A deterministic photo-like RGB uint8 array: a smooth colour field (low-frequency cosines),
    25 filled ellipses and rectangles with their own colour gradients (edges at every scale),
    fine texture and sensor-like noise (sigma 4 grey levels). Not a photo; sized and structured
    so that decoding, resizing and blurring cost what they cost on one."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 3.0, 2) * 2 * np.pi / np.array([width, height])
            img[..., c] += rng.uniform(20, 50) * np.cos(fx * xx + fy * yy + rng.uniform(0, 6.3))
    img += rng.uniform(60, 160, 3)
    for _ in range(25):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(5, width / 4), rng.uniform(5, height / 4)
        if rng.random() < 0.5:
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        else:
            mask = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        base = rng.uniform(0, 255, 3)
        grad = rng.uniform(-1, 1, 3) * (xx[mask] - cx)[:, None] / max(rx, 1) * 40
        img[mask] = base + grad
    texture = np.sin(xx * rng.uniform(0.5, 2)) * np.cos(yy * rng.uniform(0.5, 2))
    img += 12 * texture[..., None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpegs(out_dir, n=8, size=(500, 375), seed=0, quality=90):
    """Write n `synthetic_photo`s of size (width, height) as baseline JPEGs (PIL, `quality`,
    4:2:0 chroma subsampling: the encoding of most ImageNet files); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(n):
        path = os.path.join(out_dir, f"synthetic_{k:02d}.jpg")
        Image.fromarray(synthetic_photo(size[0], size[1], seed + k)).save(
            path, quality=quality, subsampling="4:2:0")
        paths.append(path)
    return paths


def sklearn_photos():
    """Paths of scikit-learn's two sample photos, or [] without scikit-learn."""
    try:
        import sklearn.datasets
    except ImportError:
        return []
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return sorted(glob.glob(os.path.join(folder, "*.jpg")))


def find_jpegs(folder, limit):
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith((".jpg", ".jpeg")))
    return paths[:limit]


def _two_views(transform, load):
    def run(path):
        img = load(path)
        transform(img)
        transform(img)
    return run


def pipelines(cfg):
    """{row name: function(path) doing that row's work for one source image}."""
    return {
        "reference (torchvision on PIL)": _two_views(simclr_transform(cfg), load_rgb),
        "cpu (DATA.AUGMENT_DEVICE=cpu)": _two_views(SimCLRView(cfg.DATA), decode_uint8),
        "cuda, CPU part (decode+crop+flip)": _two_views(SimCLRCrop(cfg.DATA), decode_uint8),
        "decode only (PIL, as the reference)": load_rgb,
        "decode only (as the fast paths)": decode_uint8,
    }


def measure(cfg, paths, rounds=3, seed=0):
    """{row: CPU seconds per image} over `rounds` passes of `paths`, rows interleaved per
    image; one torch thread. Each call is seeded like a loader sample."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = pipelines(cfg)
        spent = dict.fromkeys(rows, 0.0)
        for fn in rows.values():  # warm-up: imports, allocator, first-call costs
            fn(paths[0])
        count = 0
        for r in range(rounds):
            for k, path in enumerate(paths):
                for name, fn in rows.items():
                    # as TwoViewDataset seeds (torch.manual_seed would also queue CUDA seeding)
                    torch.default_generator.manual_seed(seed + r * len(paths) + k)
                    t0 = time.process_time()
                    fn(path)
                    spent[name] += time.process_time() - t0
                count += 1
        return {name: s / count for name, s in spent.items()}
    finally:
        torch.set_num_threads(threads)


def device_augment_rate(cfg, paths, device, batch=128, reps=5, seed=0):
    """Source images/s of the training device's share of DATA.AUGMENT_DEVICE=cuda (jitter,
    grayscale, blur and normalisation of both views, batched), median of `reps` timed calls on
    one collated batch of `batch` images."""
    crop = SimCLRCrop(cfg.DATA)
    views = []
    for k in range(batch):
        torch.default_generator.manual_seed(seed + k)
        img = decode_uint8(paths[k % len(paths)])
        views.append(crop(img))
    collated = torch.utils.data.default_collate(views)
    from .augment import views_to_device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for r in range(reps + 1):  # the first call warms up
        sync()
        t0 = time.perf_counter()
        for _ in range(2):  # two views per image
            views_to_device(collated, device)
        sync()
        if r:
            times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def format_table(per_image, gpu_images_per_s):
    ref = per_image[next(iter(per_image))]
    lines = [f"{'pipeline':38s} {'ms/img':>8s} {'img/s/core':>11s} {'vs reference':>13s} "
             f"{'cores/GPU':>10s}"]
    for name, s in per_image.items():
        lines.append(f"{name:38s} {s * 1e3:8.2f} {1 / s:11.1f} {ref / s:12.2f}x "
                     f"{gpu_images_per_s * s:10.1f}")
    lines.append(f"(CPU time, one thread; cores/GPU: loader cores to feed "
                 f"{gpu_images_per_s:g} source images/s per GPU)")
    return "\n".join(lines)
