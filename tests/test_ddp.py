"""Data-parallel training: 2 gloo processes give the weights of 1 process at twice the batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pared.train import FinetuneConfig, train


class Regression:
    """y = x @ w + noise: full-batch gradients differ from half-batch ones, so sharding matters."""

    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x @ torch.randn(8, 2, generator=gen) + 0.3 * torch.randn(n, 2, generator=gen)

    def train_batches(self, batch_size: int, *, seed: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        return [((self.x[i],), self.y[i]) for i in order.split(batch_size)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(output, target)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


CFG = {"steps": 12, "lr": 0.05, "optimizer": "sgd", "grad_accum": 2}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import pared.train as train_module

    writes = []
    real_save = train_module.save_checkpoint
    train_module.save_checkpoint = lambda *a, **k: writes.append(1) or real_save(*a, **k)
    model = _model(seed=rank)  # ranks start different: DDP must broadcast rank 0's weights
    cfg = FinetuneConfig(
        batch_size=16, checkpoint_dir=str(Path(out) / "ckpt"), checkpoint_every=6, **CFG
    )
    result = train(model, Regression(), cfg, progress=False)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps({"steps": result.steps, "checkpoint_writes": len(writes)})
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_match_one_process_at_twice_the_batch(tmp_path: Path) -> None:
    reference = _model(seed=0)
    train(reference, Regression(), FinetuneConfig(batch_size=32, **CFG), progress=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in reference.state_dict().items():
            assert torch.allclose(state[key], value, atol=1e-5), (rank, key)
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [f["steps"] for f in facts] == [12, 12]
    assert [f["checkpoint_writes"] for f in facts] == [2, 0]  # only rank 0 writes
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()
    # and the model moved: the comparison is not between two untrained copies
    assert not torch.allclose(reference[0].weight, _model(seed=0)[0].weight)
