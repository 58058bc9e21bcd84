"""The fast SimCLR augmentation (loco_det/pretrain/augment.py) against a plain reference.

`reference_view` is SimCLR's augmentation written out with torchvision's functional ops in
float, on explicitly given parameters. The CPU path (simplejpeg decode, uint8 crop, float32
OpenCV ops, one rounding) and the batched float path that runs on the GPU
(DATA.AUGMENT_DEVICE=cuda, here on CPU tensors) must reproduce it on the same parameters within
the tolerances stated in docs/pretraining-input.md; the parameters themselves must be drawn as
torchvision's composition draws them, and decoding must give PIL's pixels."""
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as TF2

from loco_det.pretrain import augment as A
from loco_det.pretrain.config import load_config
from loco_det.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, load_rgb, simclr_transform
from loco_det.pretrain.input_bench import synthetic_photo

BICUBIC = transforms.InterpolationMode.BICUBIC


def data_cfg(size, *extra):
    return load_config(None, [f"DATA.IMAGE_SIZE={size}", *extra]).DATA


def reference_color(x, p, size):
    """Jitter in the drawn order, grayscale and the full k x k blur, torchvision float ops."""
    if p["jitter"]:
        fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op in p["order"]:
            x = fns[op](x, float(p["factors"][op]))
    if p["gray"]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur"]:
        k = A.blur_kernel_size(size)
        s = float(p["sigma"])
        x = F.gaussian_blur(x, [k, k], [s, s])
    return x


def reference_view(pil, box, flip, p, size):
    """SimCLR's view of PIL image `pil`, float in [0, 1] before normalisation."""
    i, j, h, w = box
    v = F.resized_crop(pil, i, j, h, w, [size, size], interpolation=BICUBIC)
    if flip:
        v = F.hflip(v)
    return reference_color(F.to_tensor(v), p, size)


def reference_params(img, scale, ranges, probs):
    """One view's parameters drawn by torchvision's own functions and with its composition's
    comparisons (`data.simclr_transform`): the draws `ViewSampler` must repeat exactly.
    `probs`: jitter, grayscale and blur probabilities."""
    box = transforms.RandomResizedCrop.get_params(img, scale, A.CROP_RATIO)
    flip = bool(torch.rand(1) < 0.5)
    jitter = bool(not probs[0] < torch.rand(1))
    factors, order = [1.0, 1.0, 1.0, 0.0], [0, 1, 2, 3]
    if jitter:
        perm, *drawn = transforms.ColorJitter.get_params(*ranges)
        order = perm.tolist()
        factors = [factors[k] if f is None else f for k, f in enumerate(drawn)]
    gray = bool(torch.rand(1) < probs[1])
    blur = bool(not probs[2] < torch.rand(1))
    sigma = transforms.GaussianBlur.get_params(*A.BLUR_SIGMA) if blur else 1.0
    return box, flip, {"jitter": jitter, "factors": factors, "order": order, "gray": gray,
                       "blur": blur, "sigma": sigma}


def photo(w=200, h=150, seed=0):
    return Image.fromarray(synthetic_photo(w, h, seed))


def hwc(x):
    """(3, H, W) float tensor -> contiguous (H, W, 3) float32 array."""
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def chw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def grey_levels(a, b):
    """|a - b| in grey levels (0-255) of two [0, 1]-scaled or uint8 images."""
    def scale(t):
        return t.double() if t.dtype == torch.uint8 else t.double() * 255
    return (scale(a) - scale(b)).abs()


def draws(cfg, img_t, n, seed=0):
    sampler = A.ViewSampler(cfg)
    out = []
    for k in range(n):
        torch.default_generator.manual_seed(seed + k)
        out.append(sampler(img_t))
    return out


def collate(params):
    return torch.utils.data.default_collate([A.param_tensors(p) for p in params])


# Every op on: the comparisons then cover each op on every draw.
ALL_ON = ("DATA.COLOR_JITTER_PROB=1.0", "DATA.GRAYSCALE_PROB=0.0", "DATA.BLUR_PROB=1.0")


@pytest.mark.parametrize("extra", [(), ALL_ON])
def test_fast_cpu_view_matches_the_reference_on_the_same_parameters(extra):
    cfg = data_cfg(96, *extra)
    view = A.SimCLRView(cfg)
    pil = photo()
    img = A.to_uint8_tensor(pil)
    diffs, colour = [], []
    for box, flip, p in draws(cfg, img, 40):
        fast = view.apply(img, box, flip, p)
        assert fast.dtype == torch.uint8 and fast.shape == (3, 96, 96)
        diffs.append(grey_levels(fast, reference_view(pil, box, flip, p, 96)).flatten())
        crop = A.crop_flip(img, box, flip, 96).float() / 255
        colour.append(grey_levels(fast, reference_color(crop, p, 96)).flatten())
    d = torch.cat(diffs)
    # crop: torch's tensor resize vs PIL's (differ by up to 8 grey levels at a few sharp
    # edges, 0.03 on average); one rounding
    assert d.mean() < 0.3, d.mean()
    assert torch.quantile(d.float()[::7], 0.999) <= 2.0
    assert d.max() <= 10
    # from the same crop, the OpenCV ops are the float reference up to the final rounding
    assert torch.cat(colour).max() < 0.51


def test_crop_is_torchvisions_resized_crop_bit_for_bit():
    img = A.to_uint8_tensor(photo(230, 170, seed=4))
    for box in [(0, 0, 170, 230), (10, 20, 100, 90), (5, 7, 40, 33), (30, 0, 96, 96)]:
        for flip in (False, True):
            ref = TF2.resized_crop(img, *box, [96, 96], interpolation=BICUBIC, antialias=True)
            if flip:
                ref = TF2.horizontal_flip(ref)
            assert torch.equal(A.crop_flip(img, box, flip, 96), ref), (box, flip)


def test_batched_float_path_matches_the_reference_per_sample():
    """The GPU form: a batch with mixed parameters, each sample as if alone."""
    cfg = data_cfg(64, "DATA.COLOR_JITTER_PROB=0.7", "DATA.GRAYSCALE_PROB=0.3",
                   "DATA.BLUR_PROB=0.5")
    img = A.to_uint8_tensor(photo(120, 90, seed=3))
    params = draws(cfg, img, 24, seed=100)
    crops = torch.stack([A.crop_flip(img, box, flip, 64) for box, flip, _ in params])
    batch = collate([p for _, _, p in params])
    assert 0 < batch["jitter"].sum() < 24 and 0 < batch["gray"].sum() < 24
    assert 0 < batch["blur"].sum() < 24
    out = A.color_and_blur(crops.float() / 255, batch, A.blur_kernel_size(64))
    for b, (_, _, p) in enumerate(params):
        ref = reference_color(crops[b].float() / 255, p, 64)
        assert (out[b] - ref).abs().max() < 2e-5, b


def test_same_parameters_as_torchvisions_composition():
    """Same seed, same draws: the fast path and `simclr_transform` (PIL, rounding after every
    op, PIL's quantised HSV hue) give the same views up to the latter's rounding, which also
    puts it further from the plain float reference than the fast path is."""
    cfg = load_config(None, ["DATA.IMAGE_SIZE=96"])
    ref_tf, fast_tf = simclr_transform(cfg), A.SimCLRView(cfg.DATA)
    sampler = A.ViewSampler(cfg.DATA)
    pil = photo(seed=5)
    img = A.to_uint8_tensor(pil)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    same, other, tv_plain, fast_plain = [], [], [], []
    for k in range(40):
        torch.default_generator.manual_seed(k)
        tv = ref_tf(pil) * std + mean
        torch.default_generator.manual_seed(k)
        fast = fast_tf(img)
        torch.default_generator.manual_seed(k)
        plain = reference_view(pil, *sampler(img), 96)
        torch.default_generator.manual_seed(k + 1000)
        other.append(grey_levels(fast_tf(img), tv).flatten())
        same.append(grey_levels(fast, tv).flatten())
        tv_plain.append(grey_levels(tv, plain).flatten())
        fast_plain.append(grey_levels(fast, plain).flatten())
    same, other = torch.cat(same).float(), torch.cat(other).float()
    assert same.mean() < 2.0 and torch.quantile(same[::7], 0.99) <= 6.0, same.mean()
    assert other.mean() > 20  # other draws differ by far more: the test can tell
    assert torch.cat(fast_plain).mean() < 0.5 * torch.cat(tv_plain).mean()


@pytest.mark.parametrize("shape", [(427, 640), (120, 90), (10, 1000), (1000, 10)])
@pytest.mark.parametrize("probs", [(0.8, 0.2, 0.5), (0.7, 0.3, 0.1)])
def test_sampler_draws_exactly_what_torchvisions_functions_draw(shape, probs):
    """Draw for draw, with torchvision's get_params and its composition's comparisons; thin
    and tall images reach the central-crop fallback, 0.7 and 0.3 are not float32-exact."""
    cfg = data_cfg(64, f"DATA.COLOR_JITTER_PROB={probs[0]}", f"DATA.GRAYSCALE_PROB={probs[1]}",
                   f"DATA.BLUR_PROB={probs[2]}")
    sampler = A.ViewSampler(cfg)
    s = cfg.COLOR_JITTER
    ranges = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    ranges = (ranges.brightness, ranges.contrast, ranges.saturation, ranges.hue)
    img = torch.zeros(3, *shape, dtype=torch.uint8)
    for k in range(300):
        torch.default_generator.manual_seed(k)
        ours = sampler(img)
        after = torch.rand(1)
        torch.default_generator.manual_seed(k)
        assert ours == reference_params(img, tuple(cfg.CROP_SCALE), ranges, probs), k
        assert torch.equal(torch.rand(1), after)  # and left the generator in the same state


def test_probability_comparison_is_float32_as_torchvisions():
    """torchvision compares torch.rand(1) (float32) with p as float32: a draw equal to
    float32(0.7), which is below 0.7, is not below p."""
    r = torch.tensor([0.7], dtype=torch.float32)
    assert not bool(r < 0.7) and float(r) < 0.7
    assert not float(r) < A._float32(0.7)


def test_parameters_follow_simclrs_distribution():
    cfg = data_cfg(64)
    img = torch.zeros(3, 120, 160, dtype=torch.uint8)
    n = 3000
    ps = draws(cfg, img, n, seed=7)

    def rate(key):
        return float(np.mean([bool(p[key]) for _, _, p in ps]))

    def near(value, p):  # within 4 binomial standard deviations
        return abs(value - p) < 4 * (p * (1 - p) / n) ** 0.5

    assert near(rate("jitter"), 0.8) and near(rate("gray"), 0.2) and near(rate("blur"), 0.5)
    assert near(float(np.mean([flip for _, flip, _ in ps])), 0.5)
    areas = np.array([h * w / (120 * 160) for (_, _, h, w), _, _ in ps])
    assert areas.min() >= 0.08 - 0.01 and areas.max() <= 1.0
    ratios = np.array([w / h for (_, _, h, w), _, _ in ps])
    assert ratios.min() >= 3 / 4 - 0.05 and ratios.max() <= 4 / 3 + 0.05
    on = [p for _, _, p in ps if p["jitter"]]
    f = torch.tensor([p["factors"] for p in on])
    assert f[:, :3].min() >= 0.2 - 1e-6 and f[:, :3].max() <= 1.8 + 1e-6
    assert f[:, 3].abs().max() <= 0.2 + 1e-6 and f[:, 3].std() > 0.1
    assert all(sorted(p["order"]) == [0, 1, 2, 3] for p in on)
    assert len({tuple(p["order"]) for p in on}) == 24
    sig = torch.tensor([p["sigma"] for _, _, p in ps if p["blur"]])
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(float(sig.mean()) - 1.05) < 0.05


def _test_image():
    x = torch.from_numpy(synthetic_photo(48, 40, 1)).permute(2, 0, 1).float() / 255
    x[:, :4, :4] = 0.5  # grey pixels: no hue
    x[:, 4:6, :4] = 0.0  # black
    x[:, 6:8, :4] = 1.0  # white
    return x


@pytest.mark.parametrize("d", [-0.5, -0.2, -0.01, 0.0, 0.13, 0.5])
def test_hue_rotation_equals_torchvisions(d):
    x = _test_image()
    out = A.adjust_hue(x.unsqueeze(0), torch.tensor([d]))[0]
    assert (out - F.adjust_hue(x, d)).abs().max() < 1e-5
    assert (chw(A.hwc_hue(hwc(x), d)) - F.adjust_hue(x, d)).abs().max() < 1e-5


@pytest.mark.parametrize("f", [0.2, 0.65, 1.0, 1.45, 1.8])
def test_opencv_colour_ops_equal_torchvisions(f):
    x = _test_image()
    for ours, theirs in [(A.hwc_brightness, F.adjust_brightness),
                         (A.hwc_contrast, F.adjust_contrast),
                         (A.hwc_saturation, F.adjust_saturation)]:
        out = chw(ours(hwc(x), f))
        assert (out - theirs(x, f)).abs().max() < 1e-5, ours.__name__
    gray = chw(A.hwc_grayscale(hwc(x)))
    assert (gray - F.rgb_to_grayscale(x, num_output_channels=3)).abs().max() < 1e-5


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.3, 2.0])
@pytest.mark.parametrize("shape,k", [((224, 224), 23), ((40, 56), 7)])
def test_separable_blurs_equal_torchvisions(sigma, shape, k):
    x = torch.from_numpy(synthetic_photo(shape[1], shape[0], 2)).permute(2, 0, 1).float() / 255
    ref = F.gaussian_blur(x, [k, k], [sigma, sigma])
    out = A.gaussian_blur(x.unsqueeze(0), torch.tensor([sigma]), k)[0]
    assert (out - ref).abs().max() < 1e-5
    assert (chw(A.hwc_blur(hwc(x), sigma, k)) - ref).abs().max() < 1e-5


def test_blur_taps_are_torchvisions_less_negligible_tails():
    k = 23
    for sigma in (0.1, 0.5, 1.0, 1.7, 2.0):  # torchvision's kernel: exp(-x^2 / 2 sigma^2) / sum
        half = k // 2
        x = torch.linspace(-half, half, k)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        kernel = (pdf / pdf.sum()).numpy()
        taps = A.blur_taps(sigma, k)
        drop = (k - len(taps)) // 2
        assert len(taps) % 2 == 1 and np.array_equal(taps, kernel[drop:k - drop])
        assert kernel[:drop].sum() * 2 <= 2.0 ** -26
        if drop < half:  # the next tap in would not have been negligible
            assert kernel[:drop + 1].sum() * 2 > 2.0 ** -26
    assert len(A.blur_taps(2.0, 23)) == 23 and len(A.blur_taps(1.0, 23)) < 17


def _jpeg_bytes(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_decode_gives_pils_pixels_and_pil_decides_the_rest(tmp_path, monkeypatch):
    rgb = synthetic_photo(120, 90, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": PIL's load_rgb ignores it, so must we
    cmyk, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    Image.fromarray(rgb).save(png, format="PNG")
    cases = {  # name: (bytes, decoded by simplejpeg)
        "baseline420.jpg": (_jpeg_bytes(rgb, quality=90), True),
        "baseline444.jpg": (_jpeg_bytes(rgb, quality=95, subsampling=0), True),
        "progressive.jpg": (_jpeg_bytes(rgb, progressive=True, optimize=True), True),
        "gray.jpg": (_jpeg_bytes(rgb[..., 1]), True),
        "exif.jpg": (_jpeg_bytes(rgb, exif=exif.tobytes()), True),
        "padded.jpg": (_jpeg_bytes(rgb) + b"\x00" * 10, True),
        "cmyk.jpg": (cmyk.getvalue(), False),  # CMYK to RGB is PIL's own formula
        "png_named.jpg": (png.getvalue(), False),
    }
    calls = []
    decode_jpeg = A.simplejpeg.decode_jpeg
    monkeypatch.setattr(A.simplejpeg, "decode_jpeg",
                        lambda *a, **k: calls.append(1) or decode_jpeg(*a, **k))
    for name, (data, fast) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        calls.clear()
        ours = A.decode_uint8(str(path))
        assert bool(calls) == fast, name
        assert ours.dtype == torch.uint8 and ours.shape == (3, 90, 120), name
        assert torch.equal(ours, A.to_uint8_tensor(load_rgb(str(path)))), name


def test_truncated_and_broken_jpegs_fail_as_with_pil(tmp_path):
    data = _jpeg_bytes(synthetic_photo(120, 90, 7))
    with pytest.raises(ValueError, match="Premature end"):  # strict: PIL then decides
        A.simplejpeg.decode_jpeg(data[:len(data) // 2], "RGB")
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg \xff\xd9")
    for path in (tmp_path / "truncated.jpg", tmp_path / "garbage.jpg"):
        with pytest.raises(OSError) as pil_error:
            load_rgb(str(path))
        with pytest.raises(type(pil_error.value), match=str(pil_error.value)[:20]):
            A.decode_uint8(str(path))


def test_views_to_device_normalises_uint8_and_augments_dicts():
    cfg = data_cfg(32)
    img = A.to_uint8_tensor(photo(60, 50))
    views = torch.stack([A.SimCLRView(cfg)(img) for _ in range(3)])
    out = A.views_to_device(views, torch.device("cpu"))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (views.float() / 255 - mean) / std, atol=1e-6)

    crops = [A.SimCLRCrop(cfg)(img) for _ in range(3)]
    batch = torch.utils.data.default_collate(crops)
    assert batch["image"].dtype == torch.uint8
    assert batch["factors"].shape == (3, 4) and batch["factors"].dtype == torch.float32
    assert batch["order"].dtype == torch.int64 and batch["blur"].dtype == torch.bool
    out = A.views_to_device(batch, torch.device("cpu"))
    params = {k: v for k, v in batch.items() if k != "image"}
    expect = A.color_and_blur(batch["image"].float() / 255, params, A.blur_kernel_size(32))
    assert torch.allclose(out, (expect - mean) / std, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        A.views_to_device(views.float(), torch.device("cpu"))


def test_views_do_not_depend_on_the_thread_count():
    """A loader worker has one intra-op thread, the training process (DATA.NUM_WORKERS=0)
    several, for torch and for OpenCV: the views must be bit-identical."""
    cfg = load_config(None, ["DATA.COLOR_JITTER_PROB=1.0"]).DATA
    fast = A.SimCLRView(cfg)
    img = A.to_uint8_tensor(photo(500, 375))
    before = torch.get_num_threads(), cv2.getNumThreads()

    def views(threads):
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        out = []
        for k in range(40):
            torch.default_generator.manual_seed(k)
            out.append(fast(img))
        assert cv2.getNumThreads() == threads  # the view restores the caller's setting
        return out

    try:
        one, four = views(1), views(4)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
    assert all(torch.equal(a, b) for a, b in zip(one, four))
