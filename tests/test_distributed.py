"""Head-parallel HyperAttention over gloo: 2 and 4 CPU processes equal the single-process result."""

import os
import socket

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, causal, backend, hk, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hyperref import HyperConfig, make_draws

        from hyperref import gpu
        from hyperref.gpu.distributed import hyper_attention_distributed

        b, h, n, d = 1, 4, 128, 16
        cfg = HyperConfig(bits=3, block=16, samples=8, min_seq_len=24)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, h, n, d, generator=g)
        k = torch.randn(b, hk, n, d, generator=g)
        v = torch.randn(b, hk, n, d, generator=g)
        draws = make_draws(cfg, n, n, d, causal=causal, batch_shape=(b, h), rng=1)
        go = torch.randn(b, h, n, d, generator=g)
        gl = torch.randn(b, h, n, generator=g)
        # single-process result and gradients
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = gpu.hyper_attention(*full, causal=causal, config=cfg, draws=draws, return_lse=True,
                                       exact_hash=True, backend=backend)
        ((out * go).sum() + (torch.where(torch.isfinite(lse), lse, 0) * gl).sum()).backward()
        # this rank's shard
        s = slice(rank * n // world, (rank + 1) * n // world)
        local = [x[:, :, s].clone().requires_grad_() for x in (q, k, v)]
        out_d, lse_d = hyper_attention_distributed(*local, causal=causal, config=cfg, draws=draws,
                                                   return_lse=True, exact_hash=True, backend=backend)
        ((out_d * go[:, :, s]).sum() + (torch.where(torch.isfinite(lse_d), lse_d, 0) * gl[:, :, s]).sum()).backward()
        errs = [float((out_d - out[:, :, s]).abs().max().detach()),
                float((lse_d - lse[:, :, s]).abs().max().detach())]
        # the gradient of each shard sums the contributions of every rank: compare after the exchange
        errs += [float((a.grad - bfull.grad[:, :, s]).abs().max()) for a, bfull in zip(local, full)]
        results[rank] = errs
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hk", [4, 2])
def test_distributed_equals_single_process(world, causal, hk):
    if hk % world:
        pytest.skip("key/value heads must divide by the world size")
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), causal, "dense", hk, results), nprocs=world, join=True)
    for rank in range(world):
        assert max(results[rank]) < 1e-5, (rank, results[rank])


def test_distributed_triton_interpreter():
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), True, "triton", 4, results), nprocs=2, join=True)
    for rank in range(2):
        assert max(results[rank]) < 1e-4, (rank, results[rank])


def _bad_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hyperref.gpu.distributed import hyper_attention_distributed

        q = torch.randn(1, 3, 8, 16)
        try:
            hyper_attention_distributed(q, q, q, backend="dense")
            results[rank] = "no error"
        except ValueError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def test_heads_not_divisible_is_a_clear_error():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_bad_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert all("divisible by the world size" in results[r] for r in range(2))


def test_bad_kernel_options_are_refused_before_any_exchange():
    from hyperref import InputError
    from hyperref.gpu.distributed import DistributedHyperAttention, hyper_attention_distributed

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(InputError, match="unknown option"):
        hyper_attention_distributed(q, q, q, kernel_options={"one_blocks": False})
    with pytest.raises(InputError, match="sort_chunk must be >= 1"):
        DistributedHyperAttention(kernel_options={"sort_chunk": -1})
