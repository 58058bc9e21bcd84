"""Pretraining data: clear errors for bad directories, unreadable images replaced and reported,
augmentations seeded per sample, a sampler whose global batches ignore the world size."""
import numpy as np
import pytest
import torch
from PIL import Image

from loco_det.pretrain.augment import SimCLRCrop, SimCLRView
from loco_det.pretrain.config import load_config
from loco_det.pretrain.data import (ResumableDistributedSampler, TwoViewDataset,
                                    blur_kernel_size, build_loader, simclr_transform)
from loco_det.utils import LocoError


def make_folder(root, n_per_class=4, classes=("a", "b"), size=40, bad=()):
    """A tiny ImageFolder tree of random-noise PNGs; names in `bad` get garbage bytes."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            path = root / c / f"{i:03d}.png"
            if f"{c}/{i:03d}.png" in bad:
                path.write_bytes(b"this is not a png")
            else:
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def cfg_for(root, *extra):
    return load_config(None, [f"DATA.ROOT={root}", "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=4",
                              "DATA.NUM_WORKERS=0", *extra])


def test_missing_and_empty_dirs_name_the_path(tmp_path):
    with pytest.raises(LocoError, match=f"{tmp_path / 'nope'}: data directory not found"):
        build_loader(cfg_for(tmp_path / "nope"), 0, 1, seed=1)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(LocoError, match=f"{tmp_path / 'empty'}: no images found"):
        build_loader(cfg_for(tmp_path / "empty"), 0, 1, seed=1)


def test_fewer_images_than_a_batch_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", n_per_class=1)
    with pytest.raises(LocoError, match="fewer than one global batch"):
        build_loader(cfg_for(root), 0, 1, seed=1)


def test_unreadable_image_is_replaced_and_reported(tmp_path):
    root = make_folder(tmp_path / "d", bad=("a/001.png",))
    ds = TwoViewDataset(str(root), simclr_transform(cfg_for(root)), seed=3)
    bad_index = [p for p, _ in ds.samples].index(str(root / "a" / "001.png"))
    v1, v2, label, bad = ds[(0, bad_index)]
    assert bad == bad_index and v1.shape == (3, 32, 32) and label == 0
    assert ds[(0, bad_index + 1)][3] == -1


def _pixels(view):
    return view["image"] if isinstance(view, dict) else view


@pytest.mark.parametrize("make", [simclr_transform, lambda c: SimCLRView(c.DATA),
                                  lambda c: SimCLRCrop(c.DATA)],
                         ids=["reference", "fast", "crop-for-gpu"])
def test_views_depend_only_on_seed_epoch_index(tmp_path, make):
    root = make_folder(tmp_path / "d")
    ds = TwoViewDataset(str(root), make(cfg_for(root)), seed=7)
    torch.manual_seed(0)
    a = ds[(2, 5)]
    state = torch.get_rng_state()
    torch.manual_seed(123)  # a different global RNG must not matter
    b = ds[(2, 5)]
    for va, vb in ((a[0], b[0]), (a[1], b[1])):
        if isinstance(va, dict):
            assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
        else:
            assert torch.equal(va, vb)
    assert not torch.equal(_pixels(a[0]), _pixels(a[1]))     # two different views
    assert not torch.equal(_pixels(a[0]), _pixels(ds[(3, 5)][0]))  # new views every epoch
    torch.manual_seed(0)
    ds[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)         # global RNG left untouched


def test_loader_batches_are_uint8_from_persistent_workers(tmp_path):
    root = make_folder(tmp_path / "d")
    _, sampler, loader = build_loader(cfg_for(root, "DATA.NUM_WORKERS=1",
                                              "DATA.PREFETCH_FACTOR=1"), 0, 1, seed=1)
    assert loader.persistent_workers and loader.prefetch_factor == 1
    v1, v2, labels, bad = next(iter(loader))
    assert v1.dtype == v2.dtype == torch.uint8 and v1.shape == (4, 3, 32, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_gpu_augmentation_without_cuda_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "d")
    with pytest.raises(LocoError, match="DATA.AUGMENT_DEVICE=cuda: CUDA is not available"):
        build_loader(cfg_for(root, "DATA.AUGMENT_DEVICE=cuda"), 0, 1, seed=1)


def test_sampler_global_batches_independent_of_world_size_and_resumable():
    def batches(world, start=0, epoch=1):
        per_rank = []
        for rank in range(world):
            s = ResumableDistributedSampler(23, 8, rank, world, seed=5)
            s.set_epoch(epoch, start)
            idx = [i for e, i in s]
            assert len(idx) == len(s)
            per_rank.append([idx[k:k + 8 // world] for k in range(0, len(idx), 8 // world)])
        return [sum((r[b] for r in per_rank), []) for b in range(len(per_rank[0]))]

    one = batches(1)
    assert len(one) == 2 and all(len(b) == 8 for b in one)   # tail of 7 dropped
    assert len(set(one[0] + one[1])) == 16
    assert batches(2) == one and batches(4) == one
    assert batches(2, start=1) == one[1:]
    assert batches(1, epoch=2) != one


def test_blur_kernel_scales_with_image_size():
    assert blur_kernel_size(224) == 23  # SimCLR's
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(32) == 3 and blur_kernel_size(16) == 3


def test_new_data_keys_are_validated():
    from loco_det.utils import ConfigError

    with pytest.raises(ConfigError, match="DATA.PREFETCH_FACTOR: 0 must be a positive integer"):
        load_config(None, ["DATA.PREFETCH_FACTOR=0"])
    with pytest.raises(ConfigError, match="DATA.AUGMENT_DEVICE: 'gpu' is not one of cpu, cuda"):
        load_config(None, ["DATA.AUGMENT_DEVICE=gpu"])
