"""Checkpoint windows (issue 24, part 1): schedules against their published formulas, ordering by step, the soup."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli.main import cli
from merge.errors import InvalidArgumentError, UnknownNameError
from merge.keys import RECIPE_KEY, TRAIN_KEY
from merge.windows import SCHEDULES, checkpoint_step, plan_window, schedule_weights, window_soup


# --- each schedule against its formula, computed here independently -------------------------------------------

def _megatron(s, n: int) -> list[float]:
    """Megatron-LM tools/checkpoint/weighted_merge.py schedule_to_merge_coefficients, written out by hand."""
    if n == 1:
        return [1.0]
    pts = [s(i / n) for i in range(n)]
    out = [pts[i] - pts[i + 1] for i in range(n - 1)] + [pts[n - 1]]
    out[0] = 1.0 - sum(out[1:])
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_wsm_schedules_match_megatrons_coefficients(n: int) -> None:
    decays = {"linear": lambda x: 1 - x, "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
              "minus-sqrt": lambda x: 1 - math.sqrt(x)}
    for name, s in decays.items():
        assert schedule_weights(name, n) == pytest.approx(_megatron(s, n), abs=1e-15), name


def test_minus_sqrt_weights_in_closed_form() -> None:
    # w_i = sqrt((i+1)/n) - sqrt(i/n) for i < n-1, and w_(n-1) = 1 - sqrt((n-1)/n)
    n = 5
    want = [math.sqrt((i + 1) / n) - math.sqrt(i / n) for i in range(n - 1)] + [1 - math.sqrt((n - 1) / n)]
    assert schedule_weights("minus-sqrt", n) == pytest.approx(want, abs=1e-15)
    assert schedule_weights("linear", n) == pytest.approx([0.2] * 5, abs=1e-15)  # WSM: linear decay <-> uniform


def test_ema_weights_unroll_pmas_recursion() -> None:
    # PMA: avg_k = d * avg_(k-1) + (1 - d) * theta_k from avg_1 = theta_1: run the recursion on basis vectors
    d, n = 0.8, 6
    avg = np.eye(n)[0]
    for k in range(1, n):
        avg = d * avg + (1 - d) * np.eye(n)[k]
    assert schedule_weights(f"ema:{d}", n) == pytest.approx(avg.tolist(), abs=1e-15)
    assert schedule_weights("ema:0", 3) == [0.0, 0.0, 1.0]  # decay 0: the newest alone


def test_uniform_is_the_simple_moving_average() -> None:
    assert schedule_weights("uniform", 4) == [0.25] * 4


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("n", [1, 4, 9])
def test_every_schedule_sums_to_one_and_is_non_negative(name: str, n: int) -> None:
    w = schedule_weights(f"{name}:0.9" if SCHEDULES[name].parameter else name, n)
    assert len(w) == n and math.isclose(sum(w), 1.0, abs_tol=1e-12) and min(w) >= 0


@pytest.mark.parametrize("spec, error, text", [
    ("bogus", UnknownNameError, "valid schedules: cosine, ema:DECAY, linear, minus-sqrt, uniform"),
    ("ema", InvalidArgumentError, "needs its decay as a number"),
    ("ema:1.5", InvalidArgumentError, "must lie in [0, 1)"),
    ("cosine:2", InvalidArgumentError, "takes no parameter"),
])
def test_bad_schedules_are_refused_with_the_fix(spec: str, error: type, text: str) -> None:
    with pytest.raises(error, match=None) as e:
        schedule_weights(spec, 3)
    assert text in str(e.value) and "\n" not in str(e.value)


# --- ordering by step ----------------------------------------------------------------------------------------

def _hf_checkpoint(root: Path, folder: str, step: int | None, value: float) -> Path:
    d = root / folder
    d.mkdir(parents=True)
    save_file({"w": torch.full((4,), value), "n": torch.tensor([step or 0])}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    if step is not None:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return d


def test_steps_come_from_trainer_state_before_the_name(tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path, "checkpoint-7", 700, 1.0)  # the folder says 7, the trainer 700
    assert checkpoint_step(d) == (700, "trainer_state.json")
    assert checkpoint_step(d / "model.safetensors") == (700, "trainer_state.json")


def test_steps_come_from_papa_merge_metadata(tmp_path: Path) -> None:
    p = tmp_path / "member.safetensors"
    save_file({"w": torch.ones(2)}, str(p), metadata={TRAIN_KEY: json.dumps({"steps": 1234})})
    assert checkpoint_step(p) == (1234, "metadata")


def test_steps_come_from_the_name_last(tmp_path: Path) -> None:
    p = tmp_path / "run3-step450.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    assert checkpoint_step(p) == (450, "name")
    d = tmp_path / "iter_0000900"
    d.mkdir()
    save_file({"w": torch.ones(2)}, str(d / "model.safetensors"))
    assert checkpoint_step(d / "model.safetensors") == (900, "name")


def test_a_member_without_a_step_is_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "final.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    with pytest.raises(InvalidArgumentError) as e:
        plan_window([p], schedule="uniform")
    assert str(p) in str(e.value) and "\n" not in str(e.value) and "rename it with its step" in str(e.value)


def test_two_members_at_one_step_are_refused(tmp_path: Path) -> None:
    a = _hf_checkpoint(tmp_path, "a-100", 100, 1.0)
    b = _hf_checkpoint(tmp_path, "b-100", 100, 2.0)
    with pytest.raises(InvalidArgumentError, match="both at step 100"):
        plan_window([a, b])


def test_window_orders_by_step_and_keeps_the_last(tmp_path: Path) -> None:
    # Lexical order (checkpoint-1000 < checkpoint-200) is not step order.
    ds = {s: _hf_checkpoint(tmp_path, f"checkpoint-{s}", s, float(s)) for s in (1000, 200, 600, 400, 800)}
    win = plan_window(sorted(ds.values()), schedule="ema:0.5", window=3)
    assert win.steps == [600, 800, 1000] and win.members == [ds[600], ds[800], ds[1000]]
    assert win.weights == pytest.approx([0.25, 0.25, 0.5]) and len(win.dropped) == 2
    by_steps = plan_window(list(ds.values()), window_steps=400)  # steps >= 1000 - 400
    assert by_steps.steps == [600, 800, 1000]


def test_window_soup_writes_the_weighted_window_and_records_it(tmp_path: Path) -> None:
    ds = {s: _hf_checkpoint(tmp_path / "run", f"checkpoint-{s}", s, float(s)) for s in (100, 200, 300, 400)}
    res = window_soup(list(ds.values()), out=tmp_path / "w.safetensors", schedule="cosine", window=3)
    w = _megatron(lambda x: (1 + math.cos(math.pi * x)) / 2, 3)
    want = sum(wi * s for wi, s in zip(w, (200, 300, 400)))
    got = load_file(str(tmp_path / "w.safetensors"))["w"]
    assert torch.allclose(got.double(), torch.full((4,), want, dtype=torch.float64), rtol=2**-22)
    rec = res.recipe["window"]
    assert rec["steps"] == [200, 300, 400] and rec["weights"] == pytest.approx(w) and rec["schedule"] == "cosine"
    assert "cos(pi x)" in rec["formula"] and "2507.17634" in rec["citation"] and rec["window"] == 3


def test_window_soup_refuses_weights(tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path, "checkpoint-1", 1, 1.0)
    with pytest.raises(InvalidArgumentError, match="drop weights"):
        window_soup([d], out=tmp_path / "o.safetensors", weights=[1.0])


def test_cli_prints_steps_weights_and_formula(tmp_path: Path) -> None:
    ds = [_hf_checkpoint(tmp_path / "run", f"checkpoint-{s}", s, float(s)) for s in (300, 100, 200)]
    out = tmp_path / "w.safetensors"
    res = CliRunner().invoke(cli, ["soup", *map(str, ds), "--schedule", "ema:0.5", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("window:         3 of 3 checkpoints, schedule ema:0.5: w_0 = d^(n-1)")
    assert "step      100 (trainer_state.json): weight 0.25" in lines[1]
    assert "step      300 (trainer_state.json): weight 0.5" in lines[3]
    assert json.loads(load_file_metadata(out)[RECIPE_KEY])["window"]["steps"] == [100, 200, 300]


def test_cli_refuses_a_window_without_a_schedule(tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path, "checkpoint-1", 1, 1.0)
    res = CliRunner().invoke(cli, ["soup", str(d), "--window", "2", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "pass --schedule" in res.output


def test_cli_names_the_member_without_a_step(tmp_path: Path) -> None:
    p = tmp_path / "final.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    res = CliRunner().invoke(cli, ["soup", str(p), "--schedule", "uniform", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and str(p) in res.stderr


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()
