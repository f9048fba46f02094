"""gather_negatives under real DDP (2 processes, gloo): the loss and the DDP-averaged gradient equal the
single-process loss over the whole batch, where every target is a negative of every query.

Without gathering each rank would only see its own half of the targets: the test also checks that the
two differ, so it fails if the gather silently stops happening."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cirlab.methods.losses import batch_contrastive

B, D_IN, D = 6, 5, 4  # per-rank batch, input and embedding widths


def data():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(D_IN, D, generator=gen),
        torch.randn(2 * B, D_IN, generator=gen),
        torch.randn(2 * B, D_IN, generator=gen),
    )


def grad_of(loss_fn, weight):
    w = weight.clone().requires_grad_(True)
    loss = loss_fn(w)
    loss.backward()
    return loss.detach(), w.grad


def worker(rank: int, init_file: str, out: dict, gather: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    weight, x_query, x_target = data()
    rows = slice(rank * B, (rank + 1) * B)
    loss, grad = grad_of(
        lambda w: batch_contrastive(x_query[rows] @ w, x_target[rows] @ w, 10.0, gather=gather), weight
    )
    dist.all_reduce(loss), dist.all_reduce(grad)  # what DDP does with gradients: the mean over ranks
    out[rank] = (loss / 2, grad / 2)
    dist.destroy_process_group()


def run_ddp(tmp_path, gather: bool):
    with mp.Manager() as manager:  # its server process stops with the block
        out = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / f"init-{gather}"), out, gather), nprocs=2, join=True)
        return out[0]


@pytest.mark.slow  # two spawned interpreters per run (fork deadlocks torch's thread pool)
def test_gathered_negatives_give_the_full_batch_loss_and_gradient(tmp_path):
    weight, x_query, x_target = data()
    full_loss, full_grad = grad_of(lambda w: batch_contrastive(x_query @ w, x_target @ w, 10.0), weight)
    loss, grad = run_ddp(tmp_path, gather=True)
    assert torch.allclose(loss, full_loss, atol=1e-6)
    assert torch.allclose(grad, full_grad, atol=1e-6)
    local_loss, local_grad = run_ddp(tmp_path, gather=False)  # the reference's per-process negatives
    assert not torch.allclose(local_loss, full_loss, atol=1e-3)
    assert not torch.allclose(local_grad, full_grad, atol=1e-3)
