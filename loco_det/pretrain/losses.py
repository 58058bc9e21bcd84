"""NT-Xent (InfoNCE with cosine similarity), the contrastive loss every unit of every method uses.

Under `torch.distributed` with more than one process, the negatives of each anchor come from the
whole global batch: embeddings are all-gathered with `gather_with_grad`, whose backward sends every
rank's share of the gradient back to the rank that produced the embedding. Each rank's loss is
the mean over its own 2N anchors, so that averaging parameter gradients over ranks afterwards (as
DDP, or an explicit all-reduce / world_size, does) gives exactly the gradient of the mean loss
over the global batch.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world():
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward is all_reduce(SUM) of the gathered gradient, then the
    local slice: each rank's loss depends on every rank's embeddings, so the gradient reaching a
    local embedding is the sum of the contributions of all ranks' losses.

    (`torch.distributed.all_gather` alone returns tensors without a gradient history: using it
    silently drops the negatives' share of the gradient.)
    """

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x):
    """Concatenate `x` (shape [n, ...], equal n on every rank) from all ranks in rank order,
    keeping the gradient path to every rank's input. Identity when not distributed."""
    _, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def _at_least_float32(z):
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def nt_xent(z1, z2, temperature):
    """NT-Xent loss of SimCLR for two batches of embeddings of the same N images.

    Shapes: z1, z2: [N, D] (any D; rows need not be normalised). Returns a scalar.

    With u = all 2N' L2-normalised embeddings of the global batch (N' = N x world_size), the first
    N' of view 1 and the next N' of view 2, and sim(i, j) = u_i . u_j / temperature, each local
    anchor i with positive p(i) (the other view of the same image) contributes

        l_i = -log( exp(sim(i, p(i))) / sum_{k != i} exp(sim(i, k)) )

    and the loss is the mean of l_i over the 2N local anchors. When not distributed this is the
    usual mean over all 2N anchors.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two [N, D] tensors of equal shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    # Never under autocast: the similarity matmul stays in (at least) float32.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _nt_xent(z1, z2, temperature)


def _nt_xent(z1, z2, temperature):
    rank, world = _world()
    n = z1.shape[0]
    # At least float32 even under autocast: exp(1/0.1) spans a large dynamic range.
    z1, z2 = _at_least_float32(z1), _at_least_float32(z2)
    a = F.normalize(torch.cat([z1, z2], dim=0), dim=1)                   # [2N, D] local anchors
    c1 = gather_with_grad(F.normalize(z1, dim=1))                        # [N', D]
    c2 = gather_with_grad(F.normalize(z2, dim=1))                        # [N', D]
    candidates = torch.cat([c1, c2], dim=0)                              # [2N', D]
    logits = a @ candidates.t() / temperature                            # [2N, 2N']
    n_global = n * world
    local = torch.arange(n, device=z1.device) + rank * n                 # local rows in c1 / c2
    self_col = torch.cat([local, local + n_global])                      # anchor's own column
    pos_col = torch.cat([local + n_global, local])                       # its positive's column
    rows = torch.arange(2 * n, device=z1.device)
    # A fill on the device (new_tensor would copy from the host and wait for the GPU).
    minus_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    logits = logits.index_put((rows, self_col), minus_inf)
    return F.cross_entropy(logits, pos_col)
