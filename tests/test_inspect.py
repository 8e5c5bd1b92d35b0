"""``papa-merge inspect`` shows the whole recipe, and ``soup`` says what went into it (issue 12, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from cli.main import cli
from merge.keys import RECIPE_KEY


def _members(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        p = tmp_path / f"member-{i:02d}-with-a-long-descriptive-name.safetensors"
        save_file({"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}, str(p))
        paths.append(p)
    return paths


def _block(lines: list[str], key: str) -> str:
    """The pretty-printed JSON under ``    key:`` (lines indented by six spaces)."""
    start = lines.index(f"    {key}:") + 1
    body = []
    for line in lines[start:]:
        if not line.startswith("      "):
            break
        body.append(line[6:])
    return "\n".join(body)


def test_soup_line_lists_members_and_weights_and_inspect_shows_the_full_recipe(tmp_path):
    paths = _members(tmp_path, 6)
    out = tmp_path / "soup.safetensors"
    weights = [6, 5, 4, 3, 1, 1]
    r = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out), "--weights", ",".join(map(str, weights))])
    assert r.exit_code == 0, r.output
    final = r.stdout.strip().splitlines()[-1]
    shares = [w / sum(weights) for w in weights]
    assert final.startswith(f"wrote {out} (2 tensors, ")
    assert final.endswith("weighted of 6 members: " + ", ".join(f"{p} x{s:.4g}" for p, s in zip(paths, shares)))

    r = CliRunner().invoke(cli, ["inspect", str(out), "--verbose"])

    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()[RECIPE_KEY])
    assert len(json.dumps(recorded)) > 1000  # long enough that a cut would have shown
    assert "..." not in r.stdout
    lines = r.stdout.splitlines()
    assert json.loads(_block(lines, RECIPE_KEY)) == recorded  # every field, nothing cut
    listed = ", ".join(f"{p.name} x{s:.4g}" for p, s in zip(paths, shares))
    assert f"  recipe:     weighted of 6 members: {listed}" in lines
    assert "    format: pt" in lines  # short entries stay on one line


def test_inspect_json_keeps_the_recipe_whole(tmp_path):
    paths = _members(tmp_path, 3)
    out = tmp_path / "soup.safetensors"
    assert CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()[RECIPE_KEY])
    assert json.loads(r.stdout)["metadata"][RECIPE_KEY] == recorded


def test_inspect_is_short_by_default_and_whole_with_verbose(tmp_path):
    paths = _members(tmp_path, 4)
    out = tmp_path / "soup.safetensors"
    assert CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out)]).exit_code == 0
    short = CliRunner().invoke(cli, ["inspect", str(out)])
    assert short.exit_code == 0, short.output
    lines = short.stdout.splitlines()
    assert len(lines) <= 16, short.stdout
    assert f"  recipe:     uniform of 4 members: {', '.join(f'{p.name} x0.25' for p in paths)}" in lines
    # The long record is named with its fields and where to see it whole; short entries stay whole.
    line = next(ln for ln in lines if ln.startswith(f"    {RECIPE_KEY}: "))
    assert "method" in line and "members" in line and line.endswith("(in full with --verbose or --json)")
    assert "    format: pt" in lines
    verbose = CliRunner().invoke(cli, ["-v", "inspect", str(out)]).stdout  # the group's -v counts too
    assert verbose == CliRunner().invoke(cli, ["inspect", str(out), "--verbose"]).stdout
    assert len(verbose.splitlines()) > 40 and json.loads(_block(verbose.splitlines(), RECIPE_KEY))["method"] == "uniform"
