"""The fast SimCLR augmentation (loco_det/pretrain/augment.py) against a plain reference.

`reference_view` is SimCLR's augmentation written out with torchvision's functional ops in
float, on explicitly given parameters. The fast CPU path (uint8 crop, float ops, one rounding)
and the batched float path that runs on the GPU (DATA.AUGMENT_DEVICE=cuda, here on CPU tensors)
must reproduce it on the same parameters within the tolerances stated in
docs/pretraining-input.md; the parameters themselves must be drawn as torchvision's composition
draws them."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from loco_det.pretrain import augment as A
from loco_det.pretrain.config import load_config
from loco_det.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, simclr_transform
from loco_det.pretrain.input_bench import synthetic_photo

BICUBIC = transforms.InterpolationMode.BICUBIC


def data_cfg(size, *extra):
    return load_config(None, [f"DATA.IMAGE_SIZE={size}", *extra]).DATA


def reference_color(x, p, size):
    """Jitter in the drawn order, grayscale and the full k x k blur, torchvision float ops."""
    if p["jitter"]:
        fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op in p["order"].tolist():
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


def photo(w=200, h=150, seed=0):
    return Image.fromarray(synthetic_photo(w, h, seed))


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


# Every op on: the comparisons then cover each op on every draw.
ALL_ON = ("DATA.COLOR_JITTER_PROB=1.0", "DATA.GRAYSCALE_PROB=0.0", "DATA.BLUR_PROB=1.0")


@pytest.mark.parametrize("extra", [(), ALL_ON])
def test_fast_cpu_view_matches_the_reference_on_the_same_parameters(extra):
    cfg = data_cfg(96, *extra)
    pil = photo()
    img = A.to_uint8_tensor(pil)
    diffs = []
    for box, flip, p in draws(cfg, img, 40):
        fast = A.color_and_blur(A.crop_flip(img, box, flip, 96).unsqueeze(0),
                                {k: v.unsqueeze(0) for k, v in p.items()}, A.blur_kernel_size(96))
        assert fast.dtype == torch.uint8 and fast.shape == (1, 3, 96, 96)
        diffs.append(grey_levels(fast[0], reference_view(pil, box, flip, p, 96)).flatten())
    d = torch.cat(diffs)
    # crop: torchvision's tensor resize vs PIL's (differ at a few sharp edges); one rounding
    assert d.mean() < 0.3, d.mean()
    assert torch.quantile(d.float()[::7], 0.999) <= 2.0
    assert d.max() <= 12


def test_batched_float_path_matches_the_reference_per_sample():
    """The GPU form: a batch with mixed parameters, each sample as if alone."""
    cfg = data_cfg(64, "DATA.COLOR_JITTER_PROB=0.7", "DATA.GRAYSCALE_PROB=0.3",
                   "DATA.BLUR_PROB=0.5")
    img = A.to_uint8_tensor(photo(120, 90, seed=3))
    params = draws(cfg, img, 24, seed=100)
    crops = torch.stack([A.crop_flip(img, box, flip, 64) for box, flip, _ in params])
    batch = {k: torch.stack([p[k] for _, _, p in params]) for k in params[0][2]}
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
    f = torch.stack([p["factors"] for p in on])
    assert f[:, :3].min() >= 0.2 - 1e-6 and f[:, :3].max() <= 1.8 + 1e-6
    assert f[:, 3].abs().max() <= 0.2 + 1e-6 and f[:, 3].std() > 0.1
    assert all(sorted(p["order"].tolist()) == [0, 1, 2, 3] for p in on)
    assert len({tuple(p["order"].tolist()) for p in on}) == 24
    sig = torch.stack([p["sigma"] for _, _, p in ps if p["blur"]])
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(float(sig.mean()) - 1.05) < 0.05


@pytest.mark.parametrize("d", [-0.5, -0.2, -0.01, 0.0, 0.13, 0.5])
def test_hue_rotation_equals_torchvisions(d):
    x = torch.from_numpy(synthetic_photo(48, 40, 1)).permute(2, 0, 1).float() / 255
    x[:, :4, :4] = 0.5  # grey pixels: no hue
    out = A.adjust_hue(x.unsqueeze(0), torch.tensor([d]))[0]
    assert (out - F.adjust_hue(x, d)).abs().max() < 1e-5


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.3, 2.0])
@pytest.mark.parametrize("shape,k", [((224, 224), 23), ((40, 56), 7)])
def test_separable_blur_equals_torchvisions(sigma, shape, k):
    x = torch.from_numpy(synthetic_photo(shape[1], shape[0], 2)).permute(2, 0, 1).float() / 255
    out = A.gaussian_blur(x.unsqueeze(0), torch.tensor([sigma]), k)[0]
    assert (out - F.gaussian_blur(x, [k, k], [sigma, sigma])).abs().max() < 1e-5


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
    out = A.views_to_device(batch, torch.device("cpu"))
    params = {k: v for k, v in batch.items() if k != "image"}
    expect = A.color_and_blur(batch["image"].float() / 255, params, A.blur_kernel_size(32))
    assert torch.allclose(out, (expect - mean) / std, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        A.views_to_device(views.float(), torch.device("cpu"))


def test_views_do_not_depend_on_the_thread_count():
    """A loader worker has one intra-op thread, the training process (DATA.NUM_WORKERS=0)
    several: the views must be bit-identical (a thread-dependent reduction order once moved a
    few rounded pixels by one grey level)."""
    cfg = load_config(None, ["DATA.COLOR_JITTER_PROB=1.0"]).DATA
    fast = A.SimCLRView(cfg)
    img = A.to_uint8_tensor(photo(500, 375))
    before = torch.get_num_threads()

    def views(threads):
        torch.set_num_threads(threads)
        out = []
        for k in range(40):
            torch.default_generator.manual_seed(k)
            out.append(fast(img))
        return out

    try:
        one, four = views(1), views(4)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, four))
