"""DistributedDataParallel on CPU: two gloo processes run the pipeline and stay in sync."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lutnn.pipeline import load_config
from pipeline_cfg import tiny_config, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LUTNN_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from lutnn.pipeline import Pipeline
    from lutnn.pipeline.train import shutdown_distributed

    pipe = Pipeline(load_config(cfg_path))
    assert pipe.env.world == world and pipe.env.rank == rank
    pipe.prepare()
    pipe.stage_teacher()
    pipe.stage_prototypes()
    model = pipe.stage_train(resume=False)
    results = pipe.stage_eval()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"params": flat, "steps": len(pipe.loader(True)), "top1": results["retrained"].top1},
               os.path.join(out, f"rank{rank}.pt"))
    shutdown_distributed()


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    # 64 samples, 2 ranks, batch 16: each rank takes 2 optimiser steps per epoch on its own shard
    cfg = tiny_config(tmp_path / "run", data={"train_limit": 64, "batch_size": 16, "eval_limit": 50},
                      teacher={"epochs": 1}, train={"epochs": 1})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    mp.spawn(_worker, args=(2, _free_port(), str(path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["steps"] == r1["steps"] == 2
    assert torch.equal(r0["params"], r1["params"])  # DDP averaged the gradients of different shards
    assert r0["top1"] == r1["top1"]  # sharded evaluation, all-reduced
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == 2
    init = load_file(str(tmp_path / "run/prototypes.safetensors"))
    assert init and not all(torch.equal(v, ckpt["model"][k]) for k, v in init.items())  # they did train


def test_torchrun_with_one_process_still_runs_ddp(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node=1`` starts the process group (NCCL on a GPU, gloo here) and wraps the
    model in DDP, so one device runs the multi-GPU code path; a plain launch stays single-process."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lutnn.pipeline import Pipeline
    from lutnn.pipeline.train import init_distributed, shutdown_distributed

    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    assert not init_distributed("cpu").distributed
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torchrun sets, besides the rank variables
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config(tmp_path / "run", data={"train_limit": 64, "batch_size": 32}, teacher={"epochs": 1})
    try:
        pipe = Pipeline(load_config(write_config(tmp_path / "cfg.yaml", cfg)))
        assert pipe.env.distributed and (pipe.env.rank, pipe.env.world) == (0, 1)
        assert dist.get_backend() == "gloo"
        assert isinstance(pipe.env.wrap(torch.nn.Linear(2, 2)), DistributedDataParallel)
        pipe.prepare()
        pipe.stage_teacher()
    finally:
        shutdown_distributed()
    assert torch.load(tmp_path / "run/checkpoints/teacher_last.pt", weights_only=True)["step"] == 2
