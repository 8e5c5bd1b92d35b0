"""The scripts in examples/ run as their docstrings say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.ckpt_factory import reference, save_members

ROOT = Path(__file__).resolve().parents[1]


def test_merge_checkpoints_example(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "merge_checkpoints.py"), *map(str, paths),
                          "--out", str(tmp_path / "soups")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "3 members, 9 tensors" in res.stdout and "recorded: weighted [2.0, 1.0, 1.0]" in res.stdout
    got = load_file(str(tmp_path / "soups" / "weighted.safetensors"))["classifier.bias"].double()
    assert torch.allclose(got, torch.from_numpy(reference(sds, [2, 1, 1])["classifier.bias"]), rtol=1e-6, atol=1e-7)
