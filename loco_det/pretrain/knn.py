"""Weighted kNN readout per stage: a readout with no training, cheap enough to watch during
pretraining.

The protocol of InstDisc (Wu et al. 2018) as used by DINO (Caron et al. 2021): every image of
the train split and of the validation split goes through the frozen encoder (BN in eval mode,
resize + center crop, no augmentation); each stage's output (res2..res5) is globally
average-pooled and L2-normalised. A validation image votes with its k most cosine-similar
training images, neighbour i with weight exp(s_i / T) for its class; the class with the largest
summed weight is the prediction. k = 20 and 200, T = 0.07.

Memory: features are kept in float16 on the host ((res2..res5 = 3840 dims for ResNet-50) x 1.28M
ImageNet images is ~9.8 GB; with several processes each holds its share). One stage at a time
goes to the device (res5: 2048 dims, 5.2 GB on one process), and the similarity is computed for
a chunk of queries against a chunk of that memory bank at a time, keeping a running top-k, so
the full similarity matrix never exists.
"""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ..records import KnnRecord
from ..stats import binomial_stderr
from ..utils import LocoError, draw_seed
from .data import find_images
from .model import stage_channels
from .readout import (SMALL_MAX_IMAGES, STAGE_NAMES, LabeledImages, default_data_dir,
                      eval_transform, inference_setup, load_encoder, make_loader, majority_top1,
                      pooled_features, read_checkpoint)

KS = (20, 200)
TEMPERATURE = 0.07


def knn_predict(train_feats, train_labels, query_feats, num_classes, ks=KS,
                temperature=TEMPERATURE, query_chunk=1024, train_chunk=65536, device=None):
    """Weighted kNN class predictions for every k in `ks`.

    train_feats (N, D) and query_feats (Q, D): L2-normalised features (any float dtype, any
    device); train_labels (N,) int64 in [0, num_classes). Similarity s = cosine; neighbour weight
    exp(s / temperature); score_c = sum of the weights of the k nearest neighbours of class c.
    k larger than N uses all N. Ties between equal similarities go to the lower training index.
    Returns {k: (Q,) int64 predictions on the CPU}."""
    kmax = min(max(ks), train_feats.shape[0])
    best_s, best_i = knn_candidates(train_feats, query_feats, kmax, 0, query_chunk, train_chunk,
                                    device)
    return knn_vote(best_s, best_i, train_labels, num_classes, ks, temperature)


def knn_candidates(train_feats, query_feats, kmax, offset=0, query_chunk=1024, train_chunk=65536,
                   device=None):
    """(similarities (Q, k) float32, indices (Q, k) int64) of every query's k = min(kmax, N)
    nearest rows of train_feats, on `device`: similarity descending, equal similarities by lower
    index; indices count from `offset` (the rows' place in a larger, sharded bank).

    The memory bank goes to the device once, in its own dtype (float16 from
    `extract_normalised`: ResNet-50's res5 bank of ImageNet is 5.2 GB); each chunk is widened to
    float32 there. Per chunk, `topk` selects the candidates and only those 2 x k are sorted."""
    device = torch.device(device) if device is not None else query_feats.device
    n = train_feats.shape[0]
    k = min(kmax, n)
    bank = train_feats.to(device, non_blocking=True)
    out_s, out_i = [], []
    for q0 in range(0, query_feats.shape[0], query_chunk):
        q = query_feats[q0:q0 + query_chunk].to(device, torch.float32)
        best_s = torch.full((q.shape[0], 0), -math.inf, device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for t0 in range(0, n, train_chunk):
            s = q @ bank[t0:t0 + train_chunk].to(torch.float32).T
            top_s, top_i = _chunk_top(s, k)
            best_s, best_i = _merge(best_s, best_i, top_s, top_i + (offset + t0), k)
        out_s.append(best_s)
        out_i.append(best_i)
    if not out_s:
        return (torch.zeros((0, k), device=device),
                torch.zeros((0, k), dtype=torch.long, device=device))
    return torch.cat(out_s), torch.cat(out_i)


def knn_vote(best_s, best_i, train_labels, num_classes, ks=KS, temperature=TEMPERATURE):
    """{k: (Q,) int64 predictions on the CPU} from `knn_candidates`' neighbours: the class with
    the largest sum of exp(s / temperature) over each query's k nearest (all of them where
    fewer than k were found)."""
    weights = (best_s / temperature).exp()
    neighbour_labels = train_labels.to(best_i.device)[best_i]
    preds = {}
    for k in ks:
        kk = min(k, best_s.shape[1])
        scores = torch.zeros(best_s.shape[0], num_classes, device=best_s.device)
        scores.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
        preds[k] = scores.argmax(1).cpu()
    return preds


def _chunk_top(s, kmax):
    """The k = min(kmax, columns) largest entries of every row of `s`, with the ties at the
    k-th value resolved to the lower column, as a stable sort would: `topk` picks among equal
    values arbitrarily, so rows where the k-th value also occurs outside its selection take
    the stable sort instead (rare: exactly equal similarities, e.g. duplicate images)."""
    k = min(kmax, s.shape[1])
    top_s, top_i = s.topk(k, dim=1)
    ambiguous = ((s >= top_s[:, -1:]).sum(1) > k).nonzero().squeeze(1)
    if ambiguous.numel():
        order = torch.sort(s[ambiguous], dim=1, descending=True, stable=True).indices[:, :k]
        top_i[ambiguous] = order
        top_s[ambiguous] = s[ambiguous].gather(1, order)
    return top_s, top_i


def _merge(best_s, best_i, top_s, top_i, kmax):
    """The kmax best of two candidate sets, by similarity, equal similarities by lower index
    (indices are unique within a row)."""
    cand_s, cand_i = torch.cat([best_s, top_s], dim=1), torch.cat([best_i, top_i], dim=1)
    by_index = cand_i.argsort(dim=1)
    cand_s, cand_i = cand_s.gather(1, by_index), cand_i.gather(1, by_index)
    order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :kmax]
    return cand_s.gather(1, order), cand_i.gather(1, order)


@torch.no_grad()
def extract_normalised(encoder, loader, n, device, desc, progress):
    """L2-normalised pooled features of every stage as float16 CPU tensors (n, D_stage), plus
    labels; preallocated so that a 1.28M-image split never holds two copies."""
    feats = [torch.empty(n, d, dtype=torch.float16) for d in stage_channels(encoder)]
    labels, pos = torch.zeros(n, dtype=torch.long), 0
    for images, y in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        out = pooled_features(encoder, images.to(device, non_blocking=True))
        for k, f in enumerate(out):
            feats[k][pos:pos + len(y)] = F.normalize(f, dim=1).half().cpu()
        labels[pos:pos + len(y)] = y
        pos += len(y)
    return feats, labels


def shard(n, rank, world):
    """Rank `rank`'s contiguous share of n items (sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


def _all_gather_rows(t, n, world, device):
    """Every rank's rows (its `shard` of n), concatenated in rank order, on the CPU."""
    sizes = [len(shard(n, r, world)) for r in range(world)]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[:t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:size].cpu() for p, size in zip(parts, sizes)])


def _merge_ranks(best_s, best_i, kmax, n, world):
    """The kmax nearest over all ranks' candidates (each rank's from its shard of the bank),
    exactly as one process over the whole bank finds them."""
    pad = kmax - best_s.shape[1]   # a shard smaller than kmax: never-chosen fillers
    best_s = F.pad(best_s, (0, pad), value=-math.inf)
    best_i = F.pad(best_i, (0, pad), value=n)
    parts_s = [torch.empty_like(best_s) for _ in range(world)]
    parts_i = [torch.empty_like(best_i) for _ in range(world)]
    dist.all_gather(parts_s, best_s)
    dist.all_gather(parts_i, best_i)
    empty_s, empty_i = best_s[:, :0], best_i[:, :0]
    return _merge(empty_s, empty_i, torch.cat(parts_s, 1), torch.cat(parts_i, 1), kmax)


def knn_eval(encoder, train_set, val_set, device, ks=KS, temperature=TEMPERATURE, batch_size=256,
             workers=2, seed=0, progress=True, world=1, rank=0):
    """Top-1 (%) per k and stage: {"k20": {"res2": ..}, "k200": {..}} (encoder in eval mode,
    no gradients; the caller restores its mode).

    world > 1 (inside a process group; every rank calls it): each rank extracts the features
    of its shard of both splits and keeps its shard of the memory bank; the queries are
    all-gathered, every rank finds their nearest neighbours in its shard, and the candidates
    are merged into the same neighbours one process finds. Every rank returns the result."""
    encoder.eval()

    def features(dataset, desc):
        if world == 1:
            subset = dataset
        else:
            subset = torch.utils.data.Subset(dataset, shard(len(dataset), rank, world))
        return extract_normalised(encoder, make_loader(subset, batch_size, False, workers, seed),
                                  len(subset), device, desc, progress)

    train_feats, train_y = features(train_set, "knn train features")
    val_feats, val_y = features(val_set, "knn val features")
    n = len(train_set)
    offset = shard(n, rank, world).start
    if world > 1:
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        val_feats = [_all_gather_rows(f, len(val_set), world, comm) for f in val_feats]
        val_y = _all_gather_rows(val_y, len(val_set), world, comm)
        train_y = _all_gather_rows(train_y, n, world, comm)
    num_classes = len(train_set.classes)
    kmax = min(max(ks), n)
    top1 = {f"k{k}": {} for k in ks}
    for stage, tf, vf in zip(STAGE_NAMES, train_feats, val_feats):
        best_s, best_i = knn_candidates(tf, vf, kmax, offset, device=device)
        if world > 1:
            best_s, best_i = _merge_ranks(best_s.to(comm), best_i.to(comm), kmax, n, world)
        preds = knn_vote(best_s, best_i, train_y, num_classes, ks, temperature)
        for k in ks:
            top1[f"k{k}"][stage] = 100.0 * (preds[k] == val_y).float().mean().item()
    return top1


def knn_splits(data_dir, image_size):
    """(train_set, val_set) of an ImageFolder split root; labels follow train's classes."""
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    _, classes = find_images(train_dir)  # one clear error for a missing split
    find_images(val_dir)
    transform = eval_transform(image_size)
    return (LabeledImages(train_dir, transform, classes),
            LabeledImages(val_dir, transform, classes))


def run_knn(output_dir, checkpoint=None, arch=None, data_dir=None, image_size=None, ks=KS,
            temperature=TEMPERATURE, batch_size=256, workers=2, seed=-1, progress=True,
            device=None, take=None, prefix=None):
    """kNN readout of every stage; writes output_dir/knn.json (docs/formats.md), returns it.
    `checkpoint` is any checkpoint the converter accepts (`readout.read_checkpoint`)."""
    if seed is None or seed < 0:
        seed = draw_seed()
    if not ks or any(k < 1 for k in ks):
        raise LocoError(f"--k {list(ks)}: every k must be a positive integer")
    if not temperature > 0:
        raise LocoError(f"--temperature {temperature}: must be positive")
    ckpt, pre_cfg, source = None, {}, None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint, take, prefix)
        pre_cfg = yaml.safe_load(ckpt["config"]) if ckpt["config"] else {}
        source = ckpt["source"]
    encoder, method, arch = load_encoder(ckpt, arch, seed, checkpoint)
    ckpt_fp = None if ckpt is None else ckpt["fingerprint"]
    del ckpt
    data_dir = data_dir or default_data_dir(pre_cfg.get("DATA", {}).get("ROOT"))
    if image_size is None:  # read out at the trained scale, else as the linear readout does
        n_train = len(find_images(os.path.join(data_dir, "train"))[0])
        image_size = pre_cfg.get("DATA", {}).get(
            "IMAGE_SIZE", 64 if n_train <= SMALL_MAX_IMAGES else 224)
    train_set, val_set = knn_splits(data_dir, image_size)
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise LocoError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:N)") from None
    inference_setup(encoder, device)
    top1 = knn_eval(encoder, train_set, val_set, device, ks, temperature, batch_size, workers,
                    seed, progress)
    n_val = len(val_set)
    record = KnnRecord(
        checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
        method=method, arch=arch, top1=top1,
        checkpoint_fingerprint=ckpt_fp, checkpoint_source=source,
        # Binomial standard error of each top-1 in percentage points.
        top1_stderr={kk: {s: binomial_stderr(a, n_val) for s, a in per.items()}
                     for kk, per in top1.items()},
        protocol={"name": "weighted_knn", "ks": list(ks), "temperature": temperature,
                  "features": "global average pool, L2-normalised, frozen encoder (eval BN)",
                  "image_size": image_size, "train_images": len(train_set),
                  "val_images": n_val, "classes": len(train_set.classes), "seed": seed,
                  "data_dir": data_dir, "majority_val_top1": majority_top1(val_set)})
    os.makedirs(output_dir, exist_ok=True)
    record.write(output_dir)
    return record.to_json()



class PeriodicKnn:
    """RUN.KNN_PERIOD: the kNN readout of the encoder being trained, every KNN_PERIOD epochs
    (memory bank: the split root's train/, queries: its held-out val/). Every rank extracts the
    features of its share of the images and searches its share of the memory bank
    (`knn_eval`), so the readout takes 1/world of the time on one process and no rank waits
    alone in a collective for a readout on rank 0 (RUN.DIST_TIMEOUT_MIN)."""

    def __init__(self, cfg, env):
        self.period = cfg.RUN.KNN_PERIOD
        root = cfg.RUN.KNN_DATA or os.path.dirname(os.path.normpath(cfg.DATA.ROOT))
        # Cheap checks on every rank, so that a bad path stops all of them before training.
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise LocoError(f"RUN.KNN_PERIOD={self.period}: {os.path.join(root, split)} not "
                                f"found (RUN.KNN_DATA names a folder with train/ and val/; "
                                f"empty: the parent of DATA.ROOT)")
        self.root, self.device, self.main = root, env.device, env.main
        self.world, self.rank = (env.world_size, env.rank) if env.distributed else (1, 0)
        self.workers = cfg.DATA.NUM_WORKERS
        self.train_set, self.val_set = knn_splits(root, cfg.DATA.IMAGE_SIZE)
        keep = cfg.RUN.KNN_MAX_TRAIN_IMAGES
        if keep and keep < len(self.train_set.samples):
            # Evenly spaced, so every class keeps its share.
            idx = np.linspace(0, len(self.train_set.samples) - 1, keep).round().astype(int)
            self.train_set.samples = [self.train_set.samples[i] for i in idx]

    @classmethod
    def build(cls, cfg, env):
        if cfg.RUN.KNN_PERIOD < 0:
            raise LocoError(f"RUN.KNN_PERIOD={cfg.RUN.KNN_PERIOD}: epochs between kNN readouts "
                            f"must be >= 0 (0: off)")
        return cls(cfg, env) if cfg.RUN.KNN_PERIOD else None

    def due(self, done_epochs):
        return done_epochs % self.period == 0

    def __call__(self, encoder, step, done_epochs):
        """A metrics.jsonl record {"step", "epoch", "knn/k20/res5": top-1 %, ...} (on every
        rank; every rank must call it); leaves the encoder in eval mode (the caller switches
        back to train)."""
        top1 = knn_eval(encoder, self.train_set, self.val_set, self.device,
                        workers=self.workers, progress=False, world=self.world, rank=self.rank)
        record = {"step": step, "epoch": done_epochs}
        record.update({f"knn/{kk}/{stage}": v for kk, per in top1.items()
                       for stage, v in per.items()})
        return record
