"""SimCLR's two-view augmentation, fast: explicit per-view parameters, uint8 pixels, batched ops.

The augmentation is that of `data.simclr_transform` (torchvision's composition, kept as the
reference): random resized crop (bicubic), horizontal flip, colour jitter in a random order with
DATA.COLOR_JITTER_PROB, grayscale, Gaussian blur with a kernel of ~10% of the crop, normalise.
What changes is how the pixels are computed:

* `ViewSampler` draws every random parameter up front with torchvision's own `get_params`
  functions, in the order the reference composition draws them, from torch's global generator
  (which `TwoViewDataset` seeds per (seed, epoch, index)). The same seed gives the reference and
  the fast path the same crop box, flip, jitter factors and order, grayscale and blur sigma.
* The image is decoded once per pair and cropped as a uint8 tensor (torchvision's antialiased
  bicubic resize, 4x faster than PIL's on this layout). Everything after the crop runs on float
  (B, 3, H, W) batches with per-sample parameters (`color_and_blur`), so the same code serves
  a loader worker (B = 1, rounded back to uint8 once) and a GPU batch (DATA.AUGMENT_DEVICE=cuda).
* Two ops are our own because torchvision's were the bulk of the cost (docs/measurements.md):
  the blur is separable (banded matrix products instead of a 23x23 convolution; the same
  kernel, reflect padding included) and the hue rotation works on max/min/chroma directly
  instead of an HSV image (PIL's uint8 HSV round trip is slower and quantises the hue).
* Normalisation happens where the batch is used (`views_to_device`, on the training device):
  loader batches stay uint8, a quarter of float32's shared memory and host-to-device traffic.

docs/pretraining-input.md states the tolerances the tests hold the fast path to.
"""
import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF2

# torchvision's ImageNet normalisation (data.IMAGENET_MEAN/STD, which the readouts use too).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Grayscale weights of torchvision's rgb_to_grayscale (ITU-R 601-2 luma, as PIL's "L").
GRAY = (0.2989, 0.587, 0.114)
BLUR_SIGMA = (0.1, 2.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def blur_kernel_size(image_size):
    """~10% of the image side, odd, at least 3 (SimCLR: 23 px at 224 px; 7 px at 64 px)."""
    k = int(round(0.1 * image_size))
    if k % 2 == 0:
        k += 1
    return max(3, k)


class ViewSampler:
    """Draws one view's parameters the way `data.simclr_transform` does, from torch's global
    generator: crop box (i, j, h, w), flip, jitter on/off with factors (brightness, contrast,
    saturation, hue) and order, grayscale, blur on/off and sigma."""

    def __init__(self, data_cfg):
        d = data_cfg
        s = d.COLOR_JITTER
        self.scale = tuple(d.CROP_SCALE)
        self.jitter_prob = d.COLOR_JITTER_PROB
        self.gray_prob = d.GRAYSCALE_PROB
        self.blur_prob = d.BLUR_PROB
        # torchvision's ColorJitter resolves strengths to ranges (None: the op is off).
        jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)

    def __call__(self, img):
        """Parameters of one view of `img` (a (3, H, W) tensor or a PIL image): crop box and
        flip (for the worker) and a dict of tensors for `color_and_blur`."""
        box = transforms.RandomResizedCrop.get_params(img, self.scale, CROP_RATIO)
        flip = bool(torch.rand(1) < 0.5)
        # RandomApply: applied unless p < rand.
        jitter_on = not self.jitter_prob < torch.rand(1)
        factors = [1.0, 1.0, 1.0, 0.0]
        order = torch.arange(4)
        if jitter_on:
            order, *drawn = transforms.ColorJitter.get_params(*self.ranges)
            factors = [f if f is not None else factors[k] for k, f in enumerate(drawn)]
        gray = bool(torch.rand(1) < self.gray_prob)
        blur_on = not self.blur_prob < torch.rand(1)
        sigma = transforms.GaussianBlur.get_params(*BLUR_SIGMA) if blur_on else 1.0
        params = {"jitter": torch.tensor(jitter_on), "factors": torch.tensor(factors),
                  "order": order.clone(), "gray": torch.tensor(gray),
                  "blur": torch.tensor(blur_on), "sigma": torch.tensor(sigma)}
        return box, flip, params


def to_uint8_tensor(img):
    """(3, H, W) uint8 tensor of an RGB PIL image, channels-last in memory: torch's antialiased
    uint8 resize is fastest on that layout (0.5 ms against 1.3 ms for a contiguous tensor, for
    a 400x380 crop to 224 px here)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def crop_flip(img, box, flip, size):
    """Bicubic antialiased resized crop and flip of a uint8 (3, H, W) tensor -> contiguous
    (3, size, size) uint8. torchvision's tensor resize; PIL's (the reference's) agrees to a mean
    of 0.02 grey levels and is 4x slower."""
    i, j, h, w = box
    out = TF2.resized_crop(img, i, j, h, w, [size, size],
                           interpolation=TF2.InterpolationMode.BICUBIC, antialias=True)
    if flip:
        out = TF2.horizontal_flip(out)
    return out.contiguous()


# The ops below take and return float (B, 3, H, W) in [0, 1] with per-sample factors (B,), and
# clamp after each op like torchvision's float ops. A worker's uint8 view is converted once
# before them and rounded once after (`color_and_blur`): rounding between ops, as PIL does,
# would add passes and move the result away from the float reference.

def _gray(y):
    """Luma (B, 1, H, W)."""
    g = y[:, 0:1] * GRAY[0]
    g.add_(y[:, 1:2], alpha=GRAY[1])
    return g.add_(y[:, 2:3], alpha=GRAY[2])


def _blend(y, other, f):
    """f y + (1 - f) other, clamped (torchvision's _blend)."""
    f = f.float().view(-1, 1, 1, 1)
    return (y * f).add_(other * (1 - f)).clamp_(0.0, 1.0)


def adjust_brightness(y, f):
    return (y * f.float().view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(y, f):
    return _blend(y, _gray(y).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(y, f):
    return _blend(y, _gray(y), f)


def adjust_hue(y, d):
    """Rotate the hue by d[b] turns (d in [-0.5, 0.5]), HSV value and chroma kept.

    HSV's hue is the position p in [0, 6C) around the colour hexagon (C = max - min); output
    channel n is max - clamp(min(k, 4C - k), 0, C) with k = (p + n C) mod 6C, n = 5, 3, 1 for
    R, G, B: the standard HSV-to-RGB formula scaled by C. No division and no HSV image: about
    2x faster than PIL's uint8 HSV round trip, and equal to torchvision's float adjust_hue."""
    hi = y.amax(1, keepdim=True)
    lo = y.amin(1, keepdim=True)
    c = hi - lo
    c6 = 6 * c
    r, g, b = y[:, 0:1], y[:, 1:2], y[:, 2:3]
    p = torch.where(hi == r, g - b, torch.where(hi == g, b - r + 2 * c, r - g + 4 * c))
    p = p + c * (6 * d.float()).view(-1, 1, 1, 1)
    p = torch.where(p < 0, p + c6, p)
    p = torch.where(p >= c6, p - c6, p)
    k = p + c * torch.tensor((5.0, 3.0, 1.0), device=y.device).view(1, 3, 1, 1)
    k = torch.where(k >= c6, k - c6, k)
    return hi - torch.minimum(torch.minimum(k, 4 * c - k).clamp_(min=0), c)


def to_grayscale(y):
    return _gray(y).expand(-1, 3, -1, -1).contiguous()


def _blur_matrix(sigma, n, k):
    """(B, n, n) matrices M with M @ v = v convolved with the k-tap Gaussian of sigma[b], reflect
    padding folded in (torchvision's kernel: exp(-x^2 / 2 sigma^2), normalised over k taps)."""
    half = k // 2
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    w = torch.exp(-0.5 * (taps.view(1, -1) / sigma.float().view(-1, 1)) ** 2)
    w = w / w.sum(1, keepdim=True)
    src = (torch.arange(n, device=sigma.device).view(-1, 1) + taps.long().view(1, -1)).abs()
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    if half > n - 1:
        raise ValueError(f"blur kernel of {k} taps is too wide for a {n}-pixel image")
    m = torch.zeros(len(sigma), n, n, device=sigma.device)
    m.scatter_add_(2, src.unsqueeze(0).expand(len(sigma), -1, -1).contiguous(),
                   w.unsqueeze(1).expand(-1, n, -1).contiguous())
    return m


def _banded_matmul(m, y, half, block=56):
    """m @ y (B, C, n, w) for a banded (B, 1, n, n) m (nonzero within `half` of the diagonal,
    reflections included), by blocks of output rows that read only the band: half the time of
    one full product at 224 px."""
    n = y.shape[-2]
    out = torch.empty_like(y)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        lo, hi = max(0, r0 - half), min(n, r1 + half)
        out[..., r0:r1, :] = m[..., r0:r1, lo:hi] @ y[..., lo:hi, :]
    return out


def _banded_matmul_t(y, m, half, block=56):
    """y @ m^T for y (B, C, h, n) and banded (B, 1, n, n) m, as `_banded_matmul` by columns."""
    n = y.shape[-1]
    out = torch.empty_like(y)
    mt = m.transpose(-1, -2)
    for c0 in range(0, n, block):
        c1 = min(n, c0 + block)
        lo, hi = max(0, c0 - half), min(n, c1 + half)
        out[..., c0:c1] = y[..., lo:hi] @ mt[..., lo:hi, c0:c1]
    return out


def gaussian_blur(x, sigma, k):
    """Separable Gaussian blur of (B, 3, H, W) with per-sample sigma (B,), k taps, reflect
    padding: torchvision's gaussian_blur (a k x k convolution) at float precision, as banded
    matrix products along columns, then rows. 15x faster than torchvision's at 224 px."""
    half = k // 2
    h, w = x.shape[-2:]
    rows = _blur_matrix(sigma, h, k).unsqueeze(1)
    cols = rows if w == h else _blur_matrix(sigma, w, k).unsqueeze(1)
    return _banded_matmul_t(_banded_matmul(rows, x, half), cols, half).clamp_(0.0, 1.0)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_and_blur(x, params, blur_size):
    """Jitter (per-sample order and factors), grayscale and blur of x (B, 3, H, W), uint8 or
    float in [0, 1] (the result has x's dtype), with `params` as collated from `ViewSampler`
    (each a (B, ...) tensor on x's device). Each op changes only the samples it applies to."""
    if x.dtype == torch.uint8:
        y = color_and_blur(x.float().div_(255.0), params, blur_size)
        return y.mul_(255.0).round_().to(torch.uint8)
    if len(x) == 1 and x.device.type == "cpu":  # a loader worker's view: no masks
        return _color_and_blur_one(x, params, blur_size)
    jitter = params["jitter"].bool()
    for step in range(4):
        for op, fn in enumerate(_JITTER_FNS):
            x = _apply(x, jitter & (params["order"][:, step] == op), fn,
                       params["factors"][:, op])
    x = _apply(x, params["gray"].bool(), lambda v, _: to_grayscale(v), params["sigma"])
    return _apply(x, params["blur"].bool(), lambda v, s: gaussian_blur(v, s, blur_size),
                  params["sigma"])


def _color_and_blur_one(x, params, blur_size):
    if params["jitter"][0]:
        for op in params["order"][0].tolist():
            x = _JITTER_FNS[op](x, params["factors"][:, op])
    if params["gray"][0]:
        x = to_grayscale(x)
    if params["blur"][0]:
        x = gaussian_blur(x, params["sigma"], blur_size)
    return x


def _apply(x, mask, fn, arg):
    """fn(x[b], arg[b]) where mask[b], else x[b]. fn runs on the whole batch and torch.where
    picks: selecting the samples first would synchronise with the GPU at every op."""
    return torch.where(mask.view(-1, 1, 1, 1), fn(x, arg), x)


def normalize(x):
    """uint8 (or float in [0, 1]) (B, 3, H, W) -> float32 normalised with ImageNet's mean/std."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    y = x.float()
    if x.dtype == torch.uint8:
        y = y / 255.0
    return (y - mean) / std


class SimCLRView:
    """One view (call twice for a pair) of a uint8 (3, H, W) image (`to_uint8_tensor`) as a
    uint8 (3, S, S) tensor, all augmentation on the CPU. Draws from torch's global generator
    like `data.simclr_transform`."""

    uint8_input = True

    def __init__(self, data_cfg):
        self.sampler = ViewSampler(data_cfg)
        self.size = data_cfg.IMAGE_SIZE
        self.blur_size = blur_kernel_size(self.size)

    def __call__(self, img):
        box, flip, params = self.sampler(img)
        x = crop_flip(img, box, flip, self.size).unsqueeze(0)
        # One intra-op thread, as in a loader worker: a reduction's float result (the contrast
        # mean) depends on the thread count, and a last-bit difference can move a rounded
        # pixel by one grey level; views must not depend on DATA.NUM_WORKERS or the machine.
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            return color_and_blur(x, {k: v.unsqueeze(0) for k, v in params.items()},
                                  self.blur_size)[0]
        finally:
            if threads != 1:
                torch.set_num_threads(threads)


class SimCLRCrop:
    """One view's crop and flip as uint8, plus the parameters of the rest of the augmentation,
    which `views_to_device` applies batched on the training device (DATA.AUGMENT_DEVICE=cuda)."""

    uint8_input = True

    def __init__(self, data_cfg):
        self.sampler = ViewSampler(data_cfg)
        self.size = data_cfg.IMAGE_SIZE

    def __call__(self, img):
        box, flip, params = self.sampler(img)
        return {"image": crop_flip(img, box, flip, self.size), **params}


def views_to_device(views, device, memory_format=torch.contiguous_format):
    """A loader batch of views -> normalised float32 on `device`.

    `views` is a uint8 (B, 3, S, S) batch (`SimCLRView`) or a dict from `SimCLRCrop`, whose
    jitter, grayscale and blur then run here, batched, in float (blur kernel from S, as in
    the workers)."""
    if isinstance(views, dict):
        x = views["image"].to(device, non_blocking=True)
        params = {k: v.to(device, non_blocking=True) for k, v in views.items() if k != "image"}
        x = color_and_blur(x.float().div_(255.0), params, blur_kernel_size(x.shape[-1]))
        # (float in [0, 1]: normalize below takes it as is)
    elif views.dtype == torch.uint8:
        x = views.to(device, non_blocking=True)
    else:
        raise TypeError(f"loader views must be uint8 or a dict of crops and parameters, got "
                        f"{views.dtype}")
    return normalize(x).contiguous(memory_format=memory_format)
