"""Global batches that do not depend on the number of processes (pure Python: no processes).

- :class:`GlobalBatchSampler`: the union of the ranks' batch ``t`` is the one-process batch ``t``.
- :class:`ShardedSequentialSampler` and :meth:`ClusteringModule.compute_on_split`: whole-split
  passes in the one-process batches, gathered without duplicates, with the same number of calls
  on every rank (collectives inside ``fn`` match), including a rank whose last chunk is empty.
- :meth:`ClusteringModule.gather_batch` / :meth:`~ClusteringModule.gathered_loss`: a loss on the
  gathered global batch, with DDP's averaging of the ranks' gradients, gives the one-process
  gradient.

The ranks of the last two are threads sharing a fake strategy (a barrier with a timeout: a rank
that waits for a collective no other rank enters fails instead of hanging).
"""

from __future__ import annotations

import copy
import random
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from torch.utils.data import DataLoader, DistributedSampler

from clusterlight.data import ClusteringDataModule
from clusterlight.data.datamodule import GlobalBatchSampler, ShardedSequentialSampler
from clusterlight.errors import ClusterlightError
from clusterlight.methods import AEKMeans


class _Range(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _rank_batches(n: int, batch: int, world: int, rank: int, epoch: int, drop_last: bool = True,
                  seed: int = 3) -> list[list[int]]:
    sampler = GlobalBatchSampler(_Range(n), batch, world, rank, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)  # what Lightning calls every epoch
    return [b.tolist() for b in DataLoader(_Range(n), batch_size=sampler.local_batch_size, sampler=sampler)]


@pytest.mark.parametrize("n", [270, 256, 1000, 65])
@pytest.mark.parametrize("batch", [64, 12])
def test_union_of_the_ranks_batches_is_the_one_process_batch(n: int, batch: int) -> None:
    for epoch in range(3):
        one = _rank_batches(n, batch, 1, 0, epoch)
        reference = GlobalBatchSampler(_Range(n), batch, num_replicas=4 if batch % 4 == 0 else 1, seed=3)
        reference.set_epoch(epoch)
        assert one == reference.global_batches()  # the same on any rank of any world size
        assert len(one) == n // batch and all(len(b) == batch for b in one)  # drop_last: full batches only
        flat = [i for b in one for i in b]
        assert len(set(flat)) == len(flat)  # no sample twice in an epoch
        for world in (2, 3, 4):
            if batch % world:
                continue
            ranks = [_rank_batches(n, batch, world, r, epoch) for r in range(world)]
            assert all(len(r) == len(one) for r in ranks)  # every rank takes the same number of steps
            for t, expected in enumerate(one):
                assert [i for r in ranks for i in r[t]] == expected  # rank order = one-process order
    orders = [[i for b in _rank_batches(270, 64, 1, 0, epoch) for i in b] for epoch in range(2)]
    assert orders[0] != orders[1]  # a new order every epoch


def test_partial_last_batch_without_drop_last() -> None:
    for n, world in ((270, 2), (269, 2), (263, 4)):
        one = _rank_batches(n, 64, 1, 0, 1, drop_last=False)
        assert sorted(i for b in one for i in b) == list(range(n))  # one process: every sample once
        ranks = [_rank_batches(n, 64, world, r, 1, drop_last=False) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1 and len({len(r[-1]) for r in ranks}) == 1  # equal steps
        for t, expected in enumerate(one[:-1]):
            assert [i for r in ranks for i in r[t]] == expected
        last = [i for r in ranks for i in r[-1]]
        remainder = n % 64
        assert last[:remainder] == one[-1]  # the one-process last batch, in order ...
        first = one[0][:len(last) - remainder]
        assert last[remainder:] == first  # ... then padding with the epoch's first samples
        assert (len(last) - remainder == 0) == (remainder % world == 0)


def test_order_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    a = GlobalBatchSampler(_Range(100), 10, seed=5)
    b = GlobalBatchSampler(_Range(100), 10, seed=5)
    c = GlobalBatchSampler(_Range(100), 10, seed=6)
    assert list(a) == list(b) != list(c)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert torch.equal(torch_state, torch.get_rng_state()) and random.getstate() == py_state
    assert np.array_equal(np_state[1], np.random.get_state()[1])
    assert isinstance(a, DistributedSampler)  # Lightning then injects no sampler of its own


def test_batch_size_must_split_evenly_over_the_processes() -> None:
    with pytest.raises(ClusterlightError, match=r"global batch size .* divisible by the 3 processes .* 99 or 102"):
        GlobalBatchSampler(_Range(500), 100, num_replicas=3, rank=0)


class _FakeTrainer(SimpleNamespace):
    """What the DataModule and ClusteringModule read from a trainer."""


def test_datamodule_loads_its_share_of_the_global_batch() -> None:
    dm = ClusteringDataModule(dataset="digits", max_samples=300, batch_size=64)
    dm.setup()
    assert dm.train_dataloader().batch_size == 64 and len(dm.train_dataloader()) == 270 // 64
    dm.trainer = _FakeTrainer(world_size=2, global_rank=1)
    loader = dm.train_dataloader()
    assert loader.batch_size == 32 and isinstance(loader.sampler, GlobalBatchSampler)
    assert loader.sampler.rank == 1 and loader.sampler.num_replicas == 2 and len(loader) == 270 // 64
    assert dm.val_dataloader().batch_size == 32
    dm.trainer = _FakeTrainer(world_size=3, global_rank=0)
    with pytest.raises(ClusterlightError, match="global batch size"):
        dm.train_dataloader()
    big = ClusteringDataModule(dataset="digits", max_samples=300, batch_size=512)
    with pytest.raises(ClusterlightError, match="fewer than batch_size 512"):
        big.train_dataloader()
    assert len(ClusteringDataModule(dataset="digits", max_samples=300, batch_size=512,
                                    drop_last=False).train_dataloader()) == 1


@pytest.mark.parametrize("n,batch,world", [(270, 64, 2), (129, 64, 2), (129, 64, 3), (10, 4, 4), (3, 8, 4)])
def test_sharded_sequential_chunks(n: int, batch: int, world: int) -> None:
    samplers = [ShardedSequentialSampler(n, batch, world, r) for r in range(world)]
    size = samplers[0].global_batch_size
    assert size >= batch and size % world == 0
    for t in range(samplers[0].num_batches):
        together = [i for s in samplers for i in s.chunks()[t]]
        assert together == list(range(t * size, min((t + 1) * size, n)))  # the one-process batch, in order
    for s in samplers:
        got = [b.tolist() for b in DataLoader(_Range(n), batch_size=s.local_batch_size, sampler=s)]
        assert got == [list(c) for c in s.chunks() if len(c)]  # the loader yields exactly the chunks
        assert len(s) <= s.max_local_samples
    assert sorted(i for s in samplers for i in s) == list(range(n))  # nothing padded or repeated


# ----------------------------------------------------------------------------- ranks as threads
class _World:
    """Collectives between threads; a barrier timeout turns a mismatched collective into an error."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list[Any] = [None] * size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class _Strategy:
    def __init__(self, world: _World, rank: int) -> None:
        self.world, self.rank = world, rank

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        parts = self.world.exchange(self.rank, tensor.detach().clone())
        assert len({p.shape for p in parts}) == 1, "all_gather needs equal shapes on every rank"
        return torch.stack(parts)

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        return torch.stack(self.world.exchange(self.rank, tensor.clone())).sum(0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.world.exchange(self.rank, obj)[src]


def _run_ranks(size: int, fn) -> list[Any]:
    """``fn(rank, world)`` in one thread per rank; the results in rank order (errors re-raised)."""
    world, results, errors = _World(size), [None] * size, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, world)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def _attach(model: AEKMeans, dm: ClusteringDataModule, world: _World | None, rank: int) -> AEKMeans:
    size = 1 if world is None else world.size
    model._trainer = _FakeTrainer(world_size=size, global_rank=rank, is_global_zero=rank == 0, current_epoch=0,
                                  datamodule=dm, strategy=None if world is None else _Strategy(world, rank),
                                  precision_plugin=Precision())
    return model


@pytest.fixture(scope="module")
def digits() -> ClusteringDataModule:
    dm = ClusteringDataModule(dataset="digits", max_samples=300, batch_size=64)
    dm.setup()
    return dm


@pytest.mark.parametrize("world_size,batch", [(2, 64), (2, 358), (3, 63), (3, 357), (3, 100)])
def test_compute_on_split_equals_one_process(digits: ClusteringDataModule, world_size: int, batch: int) -> None:
    """359 test samples: last batches of 39 (2 ranks: 20 + 19), 1 (rank 1 gets none), 44, 2 (rank 2
    gets none); a batch of 100 on 3 ranks is rounded up to 102 (3 chunks of 34)."""
    model = AEKMeans(num_clusters=10, input_shape=digits.input_shape, widths=[8], norm="group")
    size = ShardedSequentialSampler(359, batch, world_size).global_batch_size
    assert size == (102 if batch == 100 else batch)

    def fn(images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        # depends on the size of the (global) batch, as training-mode batch norm depends on its content
        return images.flatten(1)[:, :5] * 2 + (images.shape[0] if batch_size is None else batch_size)

    one = _attach(copy.deepcopy(model), digits, None, 0).compute_on_split(fn, "test", batch_size=size)

    def rank_pass(rank: int, world: _World) -> tuple[torch.Tensor, int]:
        calls = []

        def counted(images: torch.Tensor) -> torch.Tensor:
            calls.append(images.shape[0])
            total = sum(world.exchange(rank, images.shape[0]))  # a collective, as synchronised batch norm has
            return fn(images, total)

        out = _attach(copy.deepcopy(model), digits, world, rank).compute_on_split(counted, "test", batch_size=batch)
        return out, len(calls)

    results = _run_ranks(world_size, rank_pass)
    assert len({calls for _, calls in results}) == 1  # the same number of fn calls on every rank
    for out, _ in results:
        assert torch.equal(out, one)  # placed by index, no padding row left, the one-process batches
    assert one.shape[0] == len(digits.test_dataset) == 359


def test_gathered_loss_gives_the_one_process_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    weight = torch.randn(4, 3)
    model = AEKMeans(num_clusters=2, input_shape=(1, 8, 8), widths=[8])

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(z, z)
        return (d.pow(3).mean() + z.pow(2).sum(1).mean()).float()

    w1 = weight.clone().requires_grad_()
    loss_of(x @ w1).backward()

    def rank_step(rank: int, world: _World) -> tuple[float, torch.Tensor, int]:
        m = _attach(copy.deepcopy(model), None, world, rank)
        w = weight.clone().requires_grad_()
        local = x[rank * 4:(rank + 1) * 4] @ w
        z, start = m.gather_batch(local)
        loss = m.gathered_loss(loss_of(z))
        loss.backward()
        return float(loss.detach()), w.grad, start

    results = _run_ranks(3, rank_step)
    assert [start for _, _, start in results] == [0, 4, 8]
    for value, _, _ in results:
        assert value == pytest.approx(float(loss_of(x @ weight)), rel=1e-6)  # the logged value is the loss
    ddp_grad = torch.stack([g for _, g, _ in results]).mean(0)  # DDP averages the ranks' gradients
    torch.testing.assert_close(ddp_grad, w1.grad, rtol=1e-5, atol=1e-6)

    def rank_sum(rank: int, world: _World) -> torch.Tensor:
        m = _attach(copy.deepcopy(model), None, world, rank)
        mask, _ = m.gather_batch(torch.tensor([True, rank == 1, False]))  # bool tensors travel too
        return torch.cat([mask.float(), m.global_batch_sum(torch.tensor([float(rank)]))])

    for got in _run_ranks(2, rank_sum):
        assert got.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
