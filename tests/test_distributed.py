"""A PAPA population across processes (torch.distributed, gloo on CPU) equals the same population in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import merge
from merge.errors import InvalidArgumentError
from merge.models import TRAIN_KEY
from merge.train import PopulationGroup, draw_pairs, member_blocks, mix_matrix, mix_population, pull_to_average

ROOT = Path(__file__).resolve().parents[1]


def test_member_blocks_split_the_population_evenly():
    assert member_blocks(5, 2) == [[0, 1, 2], [3, 4]]
    assert member_blocks(4, 4) == [[0], [1], [2], [3]]
    assert member_blocks(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(InvalidArgumentError, match="cannot spread 2 members over 3 processes") as e:
        member_blocks(2, 3)
    assert e.value.option == "members"
    local = PopulationGroup(3)
    assert local.indices == [0, 1, 2] and not local.distributed and local.is_main


def population(k: int) -> list[nn.Module]:
    out = []
    for s in range(k):
        torch.manual_seed(s)
        out.append(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)))
        out[-1][1].running_mean.normal_()
    return out


def fix_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(2)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from merge.train.distributed import DistributedGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = DistributedGroup(5)
        models = [population(5)[i] for i in group.indices]
        pull_to_average(models, 0.8, group=group)
        weights = mix_matrix("pairs", 5, pairs=draw_pairs(5, np.random.default_rng(1)))
        mix_population(models, weights, batches=fix_batches(), group=group)
        torch.save({i: m.state_dict() for i, m in zip(group.indices, models)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pull_and_pair_mix_across_two_processes_equal_one_process(tmp_path):
    """Uneven blocks (3 + 2 members): the all-reduce of the pull and the all-gather of PAPA-2's mix."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = {}
    for r in range(2):
        got.update(torch.load(tmp_path / f"rank{r}.pt", weights_only=True))
    models = population(5)
    pull_to_average(models, 0.8)
    weights = mix_matrix("pairs", 5, pairs=draw_pairs(5, np.random.default_rng(1)))
    assert mix_population(models, weights, batches=fix_batches()) == "batchnorm"
    assert sorted(got) == [0, 1, 2, 3, 4]
    for i, m in enumerate(models):
        for name, v in m.state_dict().items():
            torch.testing.assert_close(got[i][name], v, atol=1e-6, rtol=1e-6)


def _train_args(out: Path, method: str) -> list[str]:
    args = ["train", "--model", "small_cnn", "--data", "digits", "--limit", "256", "--epochs", "2", "--batch-size",
            "32", "--members", "4", "--diversity", "augment", "--no-progress", "--out", str(out), "--method", method]
    return args + (["--papa-every", "2"] if method == "papa" else ["--mix-every", "1", "--repair-batches", "2"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["papa", "papa-2"])
def test_torchrun_two_ranks_equal_the_one_process_run(tmp_path, method):
    """The README's command: each rank trains and writes 2 of the 4 members; rank 0 writes the average and report."""
    from cli.main import cli

    single = CliRunner().invoke(cli, _train_args(tmp_path / "one", method))
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cli.main", *_train_args(tmp_path / "two", method)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("average (papa.safetensors)") == 1  # rank 0 alone reports
    for i in range(4):
        one, two = tmp_path / "one" / f"member-0{i}.safetensors", tmp_path / "two" / f"member-0{i}.safetensors"
        with merge.open_checkpoint(one) as a, merge.open_checkpoint(two) as b:
            sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=0)
        train = json.loads(merge.read_safetensors_metadata(two)[TRAIN_KEY])
        assert train["member"] == i and train["population"] == 4 and train["method"] == method
    assert (tmp_path / "two" / "papa.safetensors").is_file() and (tmp_path / "two" / "greedy.safetensors").is_file()
    recipe = json.loads(merge.read_safetensors_metadata(tmp_path / "two" / "papa.safetensors")["papa_merge.recipe"])
    assert recipe["papa"]["world"] == 2
