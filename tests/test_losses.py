"""NT-Xent: against a slow loop, closed forms, gradcheck, and the 2-process gathered-negatives
equivalence (loss and gradients) that silently breaks in many self-supervised libraries."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco_det.pretrain.losses import gather_with_grad, nt_xent


def slow_nt_xent(z1, z2, tau):
    """Textbook loop: mean over the 2N anchors of -log softmax of the positive."""
    u = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n2 = u.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        p = (i + n) % n2
        den = sum(torch.exp(u[i] @ u[k] / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(u[i] @ u[p] / tau) / den)
    return total / n2


def test_matches_loop_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for tau in (0.1, 0.5, 1.0):
        torch.testing.assert_close(nt_xent(z1, z2, tau), slow_nt_xent(z1, z2, tau))


def test_closed_forms():
    e = torch.eye(4, dtype=torch.float64)
    tau = 0.1
    # One image, identical views: the positive is the only candidate -> loss 0.
    assert nt_xent(e[:1], e[:1], tau).item() == pytest.approx(0.0, abs=1e-12)
    # Two images, views identical, images orthogonal: -log(e^{1/t} / (e^{1/t} + 2)).
    expected = math.log(1 + 2 * math.exp(-1 / tau))
    assert nt_xent(e[:2], e[:2], tau).item() == pytest.approx(expected, rel=1e-12)
    # All four embeddings orthogonal: every similarity 0 -> log(3) (3 candidates).
    assert nt_xent(e[:2], e[2:], tau).item() == pytest.approx(math.log(3), rel=1e-12)
    # Scale invariance: rows are normalised.
    assert nt_xent(3 * e[:2], 0.5 * e[:2], tau).item() == pytest.approx(expected, rel=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    z1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3), (z1, z2))


def test_low_precision_inputs_give_float32_loss():
    z = torch.randn(4, 8).bfloat16()
    loss = nt_xent(z, z.flip(0), 0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4), 0.1)


def _dist_worker(rank, world, store, z1, z2, tau, out_dir):
    """Each rank holds its slice of the batch; saves its loss and embedding gradients."""
    torch.set_num_threads(1)
    # a file rendezvous: no port to pick (and lose to another process) before binding it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
        b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
        gathered = gather_with_grad(a)
        assert torch.equal(gathered.detach(), z1)  # rank order, all ranks
        loss = nt_xent(a, b, tau)
        loss.backward()
        torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_gathered_negatives_match_single_process(tmp_path):
    world, tau = 2, 0.2
    torch.manual_seed(2)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store"), z1, z2, tau, str(tmp_path)),
             nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = nt_xent(a, b, tau)
    full.backward()
    # Mean of the per-rank losses is the global loss ...
    torch.testing.assert_close(sum(r["loss"] for r in results) / world, full.detach())
    # ... and the embedding gradients, averaged over ranks as DDP does, are the global ones.
    n = z1.shape[0] // world
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["ga"] / world, a.grad[rank * n:(rank + 1) * n])
        torch.testing.assert_close(r["gb"] / world, b.grad[rank * n:(rank + 1) * n])
