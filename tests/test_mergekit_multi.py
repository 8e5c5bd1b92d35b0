"""Multi-stage recipes (mergekit-multi): YAML documents with names, later stages using earlier ones as models,
intermediates in a temporary folder beside the output that is removed at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from merge.errors import CheckpointNotFoundError, InvalidArgumentError
from merge.mergekit_recipe import load_recipe, run_recipe
from tests.mergekit_models import family


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("llama"), "llama", n=3, layers=4)


def _stage1(m: dict[str, Path]) -> str:
    return f"""merge_method: slerp
base_model: {m['m0']}
models:
  - model: {m['m0']}
  - model: {m['m1']}
parameters:
  t: [0.2, 0.8]
dtype: float32
"""


def _stage2(m: dict[str, Path], ref: str) -> str:
    return f"""merge_method: ties
base_model: {m['base']}
models:
  - model: {ref}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {m['m2']}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: float32
"""


def test_a_two_stage_recipe_equals_its_stages_run_by_hand(tmp_path: Path, llama) -> None:
    by_hand = tmp_path / "hand"
    by_hand.mkdir()
    run_recipe(load_recipe(text=_stage1(llama)), out=by_hand / "stage1")
    run_recipe(load_recipe(text=_stage2(llama, str(by_hand / "stage1"))), out=by_hand / "final")
    recipe = tmp_path / "multi.yml"
    recipe.write_text("name: first\n" + _stage1(llama) + "---\n" + _stage2(llama, "first"))
    parsed = load_recipe(recipe)
    assert [s.name for s in parsed.stages] == ["first"] and parsed.members[0] == "stage:first"
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    want, got = load_file(str(by_hand / "final" / "model.safetensors")), load_file(str(tmp_path / "out" /
                                                                                       "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hand", "multi.yml", "out"]  # intermediates removed


def test_stages_in_any_order_all_named_and_the_dry_run(tmp_path: Path, llama) -> None:
    recipe = tmp_path / "multi.yml"
    recipe.write_text("name: final\n" + _stage2(llama, "first") + "---\nname: first\n" + _stage1(llama))
    parsed = load_recipe(recipe)
    assert parsed.name == "final" and [s.name for s in parsed.stages] == ["first"]
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "planned: stage first" in res.output and not (tmp_path / "out").exists()


def test_a_failing_stage_leaves_no_intermediates(tmp_path: Path, llama) -> None:
    bad = _stage2(llama, "first").replace("density: 0.5", "density: 7")  # out of (0, 1]: fails when run
    recipe = tmp_path / "multi.yml"
    recipe.write_text("name: first\n" + _stage1(llama) + "---\n" + bad)
    with pytest.raises(InvalidArgumentError, match="density"):
        run_recipe(recipe, out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]


@pytest.mark.parametrize("docs,error,message", [
    (["A", "A"], InvalidArgumentError, "2 documents without a 'name'"),
    (["name: x\nA", "name: x\nA"], InvalidArgumentError, "two stages are named 'x'"),
    (["name: x\nB:y", "name: y\nB:x"], InvalidArgumentError, "cannot tell which stage is the output"),
    (["name: x\nB:y", "name: y\nB:x", "B:x"], InvalidArgumentError, "cycle"),
    (["name: x\nA", "name: y\nA", "B:x"], InvalidArgumentError, "stage 'y' is not used"),
    (["name: x\nA", "B:nothere"], CheckpointNotFoundError, r"nor a stage of this file \(x\)"),
])
def test_stages_that_do_not_chain_are_refused(llama, docs: list[str], error: type, message: str) -> None:
    def doc(spec: str) -> str:
        head, _, kind = spec.rpartition("\n") if "\n" in spec else ("", "", spec)
        body = _stage1(llama) if kind == "A" else _stage2(llama, kind.split(":", 1)[1])
        return (head + "\n" if head else "") + body

    with pytest.raises(error, match=message):
        load_recipe(text="---\n".join(doc(d) for d in docs))
