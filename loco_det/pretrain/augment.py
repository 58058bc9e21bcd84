"""SimCLR's two-view augmentation, fast: explicit per-view parameters, uint8 pixels, OpenCV ops.

The augmentation is that of `data.simclr_transform` (torchvision's composition, kept as the
reference): random resized crop (bicubic), horizontal flip, colour jitter in a random order with
DATA.COLOR_JITTER_PROB, grayscale, Gaussian blur with a kernel of ~10% of the crop, normalise.
What changes is how the pixels are computed (docs/measurements.md has the costs):

* `ViewSampler` draws every random parameter up front, with the same calls on torch's global
  generator as torchvision's composition (which `TwoViewDataset` seeds per (seed, epoch,
  index)): the same seed gives the reference and the fast paths the same crop box, flip, jitter
  factors and order, grayscale and blur sigma.
* `decode_uint8` decodes a JPEG with simplejpeg straight into an RGB array (the pixels PIL
  gives, in about three quarters of PIL's time); the crop is torchvision's antialiased bicubic
  resize on a channels-last uint8 tensor (a fifth of PIL's time).
* On the CPU (`SimCLRView`, DATA.AUGMENT_DEVICE=cpu) the jitter, grayscale and blur run on the
  view as one (H, W, 3) float32 array with OpenCV, one pass per op (`hwc_*`), rounded to uint8
  once at the end. The blur is separable, with torchvision's kernel less its negligible tails.
* With DATA.AUGMENT_DEVICE=cuda the workers stop after the crop (`SimCLRCrop`) and the training
  device applies the rest to the whole batch, each sample with its own parameters
  (`color_and_blur`, torch ops; its blur and hue rotation are our own, as fast batched ops).
* Normalisation happens where the batch is used (`views_to_device`, on the training device):
  loader batches stay uint8, a quarter of float32's shared memory and host-to-device traffic.

docs/pretraining-input.md states the tolerances the tests hold both paths to.
"""
import io
import math

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision import transforms

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
    """Draws one view's parameters exactly as `data.simclr_transform` does, from torch's global
    generator: crop box (i, j, h, w), flip, jitter on/off with factors (brightness, contrast,
    saturation, hue) and order, grayscale, blur on/off and sigma.

    The draws are those of torchvision's RandomResizedCrop.get_params, RandomHorizontalFlip,
    RandomApply, ColorJitter.get_params, RandomGrayscale and GaussianBlur.get_params, in that
    order and with the same calls on the generator (one float32 uniform per draw, randint for
    the crop offset, randperm for the jitter order), written out without their per-call
    overhead: 0.03 ms per view here instead of 0.1-0.35 ms, a tenth of the CPU path's time. A
    test checks the parameters against torchvision's functions, draw for draw."""

    def __init__(self, data_cfg):
        d = data_cfg
        s = d.COLOR_JITTER
        self.scale = tuple(d.CROP_SCALE)
        # torchvision compares a float32 draw with p as a float32 tensor op does
        self.jitter_prob = _float32(d.COLOR_JITTER_PROB)
        self.gray_prob = _float32(d.GRAYSCALE_PROB)
        self.blur_prob = _float32(d.BLUR_PROB)
        self.log_ratio = torch.log(torch.tensor(CROP_RATIO)).tolist()
        # torchvision's ColorJitter resolves strengths to ranges (None: the op is off).
        jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        self._u = torch.empty(1)

    def _uniform(self, lo=0.0, hi=1.0):
        """torch.empty(1).uniform_(lo, hi).item() (torch.rand(1) for [0, 1))."""
        return self._u.uniform_(lo, hi).item()

    def crop_box(self, height, width):
        """RandomResizedCrop.get_params for an image of height x width."""
        area = height * width
        for _ in range(10):
            target_area = area * self._uniform(*self.scale)
            aspect_ratio = self._u.uniform_(*self.log_ratio).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,)))
                j = int(torch.randint(0, width - w + 1, size=(1,)))
                return i, j, h, w
        # torchvision's fallback: the central crop of the nearest allowed aspect ratio
        in_ratio = width / height
        w, h = width, height
        if in_ratio < min(CROP_RATIO):
            h = int(round(w / min(CROP_RATIO)))
        elif in_ratio > max(CROP_RATIO):
            w = int(round(h * max(CROP_RATIO)))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        """Parameters of one view of `img` (a (3, H, W) tensor): crop box and flip, and a dict
        of plain Python values for the colour ops and the blur (jitter on/off, the four factors,
        the order as a list of op indices, grayscale, blur on/off, sigma); `param_tensors` turns
        it into what a loader batch collates."""
        box = self.crop_box(*img.shape[-2:])
        flip = self._uniform() < 0.5
        jitter_on = not self.jitter_prob < self._uniform()  # RandomApply: on unless p < rand
        factors = [1.0, 1.0, 1.0, 0.0]
        order = [0, 1, 2, 3]
        if jitter_on:
            order = torch.randperm(4).tolist()
            factors = [factors[k] if r is None else self._uniform(*r)
                       for k, r in enumerate(self.ranges)]
        gray = self._uniform() < self.gray_prob
        blur_on = not self.blur_prob < self._uniform()
        sigma = self._uniform(*BLUR_SIGMA) if blur_on else 1.0
        params = {"jitter": jitter_on, "factors": factors, "order": order, "gray": gray,
                  "blur": blur_on, "sigma": sigma}
        return box, flip, params


def _float32(p):
    return float(torch.tensor(p, dtype=torch.float32))


def param_tensors(params):
    """`ViewSampler`'s parameters as tensors, which a loader batch collates into the (B, ...)
    tensors `color_and_blur` takes: bool jitter/gray/blur, float32 factors (4) and sigma, int64
    order (4). (Made through numpy: torch.tensor costs ten times as much per call.)"""
    arrays = {"jitter": np.array(params["jitter"]),
              "factors": np.array(params["factors"], np.float32),
              "order": np.array(params["order"], np.int64), "gray": np.array(params["gray"]),
              "blur": np.array(params["blur"]), "sigma": np.array(params["sigma"], np.float32)}
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


# JPEG colour spaces simplejpeg (libjpeg-turbo, as PIL) decodes here to PIL's RGB pixels; CMYK
# and YCCK JPEGs go to PIL, whose CMYK-to-RGB conversion is its own.
_JPEG_COLORSPACES = ("YCbCr", "RGB", "Gray")


def decode_uint8(path):
    """The RGB image at `path` as a uint8 (3, H, W) tensor, channels-last in memory: pixel for
    pixel what PIL gives (`data.load_rgb`), in about three quarters of PIL's time here.

    JPEGs in `_JPEG_COLORSPACES` within PIL's pixel limit are decoded by simplejpeg: the same
    libjpeg-turbo decoder with the same settings (accurate DCT, smooth upsampling, EXIF
    orientation ignored as PIL does), called once on the whole file straight into an RGB array.
    It is strict: a file with anything libjpeg-turbo warns about (truncated, corrupt data),
    like every other file (PNGs, CMYK JPEGs, other formats), is left to PIL, which decodes it
    or raises what `load_rgb` raises."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if (colorspace in _JPEG_COLORSPACES
                    and height * width <= (Image.MAX_IMAGE_PIXELS or float("inf"))):
                return torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB")).permute(2, 0, 1)
        except ValueError:  # libjpeg-turbo's error or warning: PIL decides below
            pass
    with Image.open(io.BytesIO(data)) as img:
        return to_uint8_tensor(img.convert("RGB"))


def to_uint8_tensor(img):
    """(3, H, W) uint8 tensor of an RGB PIL image or (H, W, 3) uint8 array, channels-last in
    memory (a view of the array): the layout torch's antialiased uint8 resize and OpenCV want."""
    arr = img if isinstance(img, np.ndarray) else np.array(img)
    return torch.from_numpy(arr).permute(2, 0, 1)


def crop_flip(img, box, flip, size):
    """Bicubic antialiased resized crop and flip of a uint8 (3, H, W) tensor -> (3, size, size)
    uint8, channels-last in memory (`.permute(1, 2, 0)` is a contiguous (size, size, 3) array).

    torchvision's resized_crop on a tensor, bit for bit (a test checks), with the crop copied
    to a contiguous channels-last block first: torch's vectorised uint8 path needs that layout
    (0.2-0.5 ms per 224 px view here, about 0.1-0.2 ms more from a strided crop, and about
    1.5 ms for PIL's resize, the reference's; PIL's and torch's agree to a mean of 0.03 grey
    levels, at most 8 at a few sharp edges)."""
    i, j, h, w = box
    crop = img[:, i:i + h, j:j + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic",
                                          antialias=True)[0]
    if flip:
        out = torch.from_numpy(cv2.flip(np.ascontiguousarray(out.permute(1, 2, 0).numpy()), 1))
        out = out.permute(2, 0, 1)
    return out


# The CPU path: one view as a contiguous (H, W, 3) float32 array in [0, 1], with OpenCV, one
# pass per op. Brightness, contrast, saturation and grayscale are affine maps of a pixel's RGB
# (one cv2.transform each), the hue rotation goes through float HSV, the blur is a separable
# filter. Each op clamps to [0, 1] where torchvision's float op does.

def _clamp(x):
    flat = x.reshape(x.shape[0], -1)  # one channel: cv2's scalar thresholds then apply to all
    cv2.threshold(flat, 1.0, 1.0, cv2.THRESH_TRUNC, dst=flat)
    cv2.threshold(flat, 0.0, 0.0, cv2.THRESH_TOZERO, dst=flat)
    return x


def _affine(x, matrix):
    """out[p] = matrix @ (r, g, b, 1)[p] for a 3x4 (or 3x3 linear) matrix."""
    return cv2.transform(x, np.asarray(matrix, np.float32))


def _blend_matrix(f, other):
    """f rgb + (1 - f) other, with `other` a 3x4 affine map (torchvision's _blend)."""
    return f * np.eye(3, 4) + (1 - f) * other


_GRAY_ROWS = np.array([GRAY + (0.0,)] * 3)  # 3x4: (r, g, b, 1) -> luma in each channel


def hwc_brightness(x, f):
    return _clamp(_affine(x, f * np.eye(3, 4)))


def hwc_contrast(x, f):
    mean = sum(w * m for w, m in zip(GRAY, cv2.mean(x)))  # mean luma, accumulated in double
    other = np.zeros((3, 4))
    other[:, 3] = mean
    return _clamp(_affine(x, _blend_matrix(f, other)))


def hwc_saturation(x, f):
    return _clamp(_affine(x, _blend_matrix(f, _GRAY_ROWS)))


def hwc_hue(x, d):
    """Rotate the hue by d turns through OpenCV's float HSV (hue in degrees, [0, 360)).

    The rotation is applied as a shift of 360 (d mod 1) degrees, so hues land in [0, 720):
    OpenCV's HSV-to-RGB reduces hues of 360 and more itself, but not negative ones (tests cover
    rotations of -0.5 to 0.5 turn against torchvision's adjust_hue)."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hue = hsv[..., 0]
    np.add(hue, np.float32(360.0 * (d % 1.0)), out=hue)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def hwc_grayscale(x):
    return _affine(x, _GRAY_ROWS)


def blur_taps(sigma, k):
    """torchvision's k-tap Gaussian kernel for `sigma` (float32, normalised over all k taps),
    without the outer taps whose total weight is below 2^-26: leaving them out moves no output
    by more than 1.5e-8 (a quarter of float32's rounding step at 1), and most sigmas need far
    fewer than k taps (sigma 1: 11 of 23, sigma 0.5: 7), which the blur's cost scales with."""
    half = k // 2
    x = torch.linspace(-half, half, k)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    taps = (pdf / pdf.sum()).numpy()
    tail = np.cumsum(taps[:half])  # weight of the outermost n taps on one side, n = 1..half
    drop = int(np.searchsorted(2 * tail, 2.0 ** -26, side="right"))
    return taps[drop:k - drop]


def hwc_blur(x, sigma, k):
    """Separable Gaussian blur with reflect padding: torchvision's gaussian_blur (the k x k
    convolution of the same kernel, reflect-padded) as a 1 x k then a k x 1 cv2.filter2D.
    (cv2.sepFilter2D computes the same; its row pass is about twice as slow here.)"""
    if k // 2 > min(x.shape[:2]) - 1:
        raise ValueError(f"blur kernel of {k} taps is too wide for a {x.shape[0]}x{x.shape[1]} "
                         "image")
    taps = blur_taps(sigma, k).reshape(1, -1)
    x = cv2.filter2D(x, cv2.CV_32F, taps, borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(x, cv2.CV_32F, taps.T, borderType=cv2.BORDER_REFLECT_101)


_HWC_JITTER = (hwc_brightness, hwc_contrast, hwc_saturation, hwc_hue)


def hwc_color_and_blur(v, params, blur_size):
    """Jitter (in the drawn order), grayscale and blur of one view, a (H, W, 3) uint8 array,
    with `params` from `ViewSampler`; returns a new (H, W, 3) uint8 array. Float32 in [0, 1]
    between the ops, rounded once at the end (rounding between ops, as PIL does, would move the
    result away from the float reference)."""
    jitter, gray, blur = params["jitter"], params["gray"], params["blur"]
    if not (jitter or gray or blur):
        return v.copy()
    x = np.divide(v, np.float32(255.0), dtype=np.float32)
    if jitter:
        for op in params["order"]:
            x = _HWC_JITTER[op](x, params["factors"][op])
    if gray:
        x = hwc_grayscale(x)
    if blur:
        x = hwc_blur(x, params["sigma"], blur_size)
    return cv2.convertScaleAbs(x, alpha=255.0)  # rounds half to even, saturates to 0-255


# The batched path (DATA.AUGMENT_DEVICE=cuda, on the training device): the ops below take and
# return float (B, 3, H, W) in [0, 1] with per-sample factors (B,), and clamp after each op like
# torchvision's float ops.

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
    float in [0, 1] (the result has x's dtype), with `params` as a loader batch collates them
    from `param_tensors` (each a (B, ...) tensor on x's device). Each op changes only the
    samples it applies to."""
    if x.dtype == torch.uint8:
        y = color_and_blur(x.float().div_(255.0), params, blur_size)
        return y.mul_(255.0).round_().to(torch.uint8)
    jitter = params["jitter"].bool()
    for step in range(4):
        for op, fn in enumerate(_JITTER_FNS):
            x = _apply(x, jitter & (params["order"][:, step] == op), fn,
                       params["factors"][:, op])
    x = _apply(x, params["gray"].bool(), lambda v, _: to_grayscale(v), params["sigma"])
    return _apply(x, params["blur"].bool(), lambda v, s: gaussian_blur(v, s, blur_size),
                  params["sigma"])


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
    """One view (call twice for a pair) of a uint8 (3, H, W) image (`decode_uint8`) as a uint8
    (3, S, S) tensor (channels-last in memory), all augmentation on the CPU. Draws from torch's
    global generator like `data.simclr_transform`."""

    uint8_input = True

    def __init__(self, data_cfg):
        self.sampler = ViewSampler(data_cfg)
        self.size = data_cfg.IMAGE_SIZE
        self.blur_size = blur_kernel_size(self.size)

    def __call__(self, img):
        return self.apply(img, *self.sampler(img))

    def apply(self, img, box, flip, params):
        """The view of `img` with the given parameters (`ViewSampler`'s)."""
        v = np.ascontiguousarray(crop_flip(img, box, flip, self.size).permute(1, 2, 0).numpy())
        # OpenCV on one thread, as in a loader worker (and with NUM_WORKERS=0 in the training
        # process, whose own setting is restored): a small view gains nothing from more.
        threads = cv2.getNumThreads()
        if threads != 1:
            cv2.setNumThreads(1)
        try:
            v = hwc_color_and_blur(v, params, self.blur_size)
        finally:
            if threads != 1:
                cv2.setNumThreads(threads)
        return torch.from_numpy(v).permute(2, 0, 1)


class SimCLRCrop:
    """One view's crop and flip as uint8, plus the parameters of the rest of the augmentation,
    which `views_to_device` applies batched on the training device (DATA.AUGMENT_DEVICE=cuda)."""

    uint8_input = True

    def __init__(self, data_cfg):
        self.sampler = ViewSampler(data_cfg)
        self.size = data_cfg.IMAGE_SIZE

    def __call__(self, img):
        box, flip, params = self.sampler(img)
        return {"image": crop_flip(img, box, flip, self.size), **param_tensors(params)}


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
