"""The merge time ``--dry-run`` and ``check`` state: input bytes over the rate measured for the method's path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli.main import cli
from merge.estimate import CPU_READ_BYTES_PER_S, estimate_merge, rate_key
from merge.soups import plan_soup


@pytest.fixture()
def members(tmp_path: Path) -> tuple[list[Path], Path]:
    g = torch.Generator().manual_seed(0)
    paths = []
    for name in ("base", "m0", "m1", "m2"):
        p = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g)}, str(p))
        paths.append(p)
    return paths[1:], paths[0]


@pytest.mark.parametrize(("method", "params", "key"), [
    ("uniform", {}, "linear"), ("ties", {"density": 0.5}, "task"), ("task_arithmetic", {}, "task:sum"),
    ("breadcrumbs", {"density": 0.5}, "task"), ("model_stock", {}, "gram"), ("dare_ties", {"density": 0.5}, "task:random"),
    ("della", {"density": 0.5}, "task:ranked"), ("multislerp", {}, "gram")])
def test_the_time_is_the_input_bytes_over_the_rate_of_the_methods_path(members, method, params, key) -> None:
    ms, base = members
    plan = plan_soup(ms, method=method, params=params, base=None if method == "uniform" else base)
    assert rate_key(plan) == key
    est = estimate_merge(plan)
    assert est.seconds == pytest.approx(plan.read_bytes / CPU_READ_BYTES_PER_S[key], rel=1e-12)
    assert "estimate" in est.basis and key in est.basis


def test_the_tensor_path_and_a_gpu_get_no_figure(members) -> None:
    ms, base = members
    plan = plan_soup(ms, method="tsv", base=base)
    assert estimate_merge(plan).seconds is None
    assert "no estimate" in estimate_merge(plan).describe()


def test_dry_run_states_the_time_as_an_estimate(members, tmp_path: Path) -> None:
    ms, base = members
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli, ["soup", "--method", "ties", "--density", "0.5", "--base", str(base), *map(str, ms),
                                 "-o", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("time:")]
    rate = re.escape(f"{CPU_READ_BYTES_PER_S['task'] / 1e9:g}")
    assert line and re.search(rf"\(estimate: reads at {rate} GB/s, measured for task merges", line[0]), r.output
    assert not out.exists()
