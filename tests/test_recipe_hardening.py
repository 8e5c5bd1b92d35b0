"""Hostile recipes and selection manifests (issue 25, items 6, 7 and 12): a one-line error of a known class,
of bounded length, in bounded time; never "unexpected ... this is a bug", never a value silently changed."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli.main import cli
from merge.errors import (CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError, MergeError,
                          UnknownNameError)
from merge.manifest import Selection, read_manifest, write_manifest
from merge.mergekit_recipe import MAX_VALUES, load_recipe, preview


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    save_file({"w": torch.zeros(3)}, str(b))
    return a, b


def alias_bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs" list: each level lists the one below ``width`` times, by alias (width**(levels+1) strings)."""
    s = "&a0 [" + ", ".join(["lol"] * width) + "]"
    for k in range(1, levels + 1):
        s = f"&a{k} [{s}" + f", *a{k - 1}" * (width - 1) + "]"
    return s


def _run(recipe: Path, out: Path) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(out)])
    return res.exit_code, res.output


# --- recipes ------------------------------------------------------------------------------------------------
def test_an_alias_bomb_is_refused_by_its_expanded_size(tmp_path: Path, models) -> None:
    # 9**7 = 4.8 million strings from a document of a few hundred bytes: its repr alone was 30 MB.
    recipe = tmp_path / "bomb.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {alias_bomb(6)}\n  - model: {models[1]}\n")
    assert len(alias_bomb(6)) < 400
    with pytest.raises(InvalidArgumentError, match=f"more than {MAX_VALUES} values once its YAML aliases"):
        load_recipe(recipe)
    code, output = _run(recipe, tmp_path / "o.safetensors")
    assert code == 2 and output.count("\n") == 1 and len(output) < 400, output[:1000]
    # The same through merge keys (<<), which PyYAML would flatten into billions of pairs while loading.
    merges = ["x0: &x0 {k: v}"] + [f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 9)}]}}" for i in range(1, 9)]
    recipe.write_text("unused:\n" + "".join(f"  {m}\n" for m in merges) + f"merge_method: linear\nmodels: [{models[0]}]\n")
    with pytest.raises(InvalidArgumentError, match="once its YAML aliases"):
        load_recipe(recipe)


def test_an_aliased_value_in_an_error_is_a_bounded_preview(tmp_path: Path, models) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {alias_bomb(3)}\n  - model: {models[1]}\n")
    with pytest.raises(InvalidArgumentError) as e:
        load_recipe(recipe)
    # The type and size of the value and its first 80 characters, not its 6561 strings.
    assert "model reference must be a path or a Hub repository, got a list of 9 items: [[[['lol', 'lol'" in str(e.value)
    assert str(e.value).endswith("...") and len(str(e.value)) < len(str(recipe)) + 200
    # Every field that shows a value shows it so.
    for snippet in (f"tokenizer_source: {alias_bomb(3)}\n", f"dtype: {alias_bomb(3)}\n",
                    f"parameters: {{weight: {alias_bomb(3)}}}\n", f"extra: {alias_bomb(3)}\n",
                    f"parameters: {{weight: [{{filter: {alias_bomb(3)}, value: 1}}]}}\n"):
        recipe.write_text(f"merge_method: linear\nmodels: [{models[0]}]\n{snippet}")
        with pytest.raises(MergeError) as e:
            load_recipe(recipe)
        assert len(str(e.value)) < len(str(recipe)) + 250, snippet


def test_preview_is_bounded_for_values_that_contain_themselves() -> None:
    loop: list = []
    loop.append(loop)
    assert preview(loop) == "a list of 1 item: " + "[" * 80 + "..."
    assert preview({"k": "v" * 1000}) == "a mapping of 1 item: " + ("{'k': '" + "v" * 1000)[:80] + "..."
    assert preview("x" * 1000) == "a string of 1000 characters: '" + "x" * 79 + "..."
    assert preview(10 ** 400 - 1) == "an integer of about 400 digits"
    assert preview(1.5) == "1.5" and preview(None) == "None"


def test_a_recipe_that_contains_itself_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: &a [*a]\n")
    with pytest.raises(InvalidArgumentError, match=r"a YAML alias refers to a value that contains it \(line 3\)"):
        load_recipe(recipe)


@pytest.mark.parametrize("name,content,message", [
    ("latin-1", b"merge_method: linear\nmodels:\n  - model: b\xe9.safetensors\n",
     r"not UTF-8 text \(byte 0xe9 at offset 41\); save the recipe as UTF-8"),
    ("nested 10,000 deep", b"merge_method: linear\nmodels:\n  - model: " + b"[" * 10_000 + b"]" * 10_000 + b"\n",
     "nested too deeply to be a recipe"),
    ("nested mappings", b"merge_method: linear\nparameters: " + b"{a: " * 10_000 + b"1" + b"}" * 10_000 + b"\n",
     "nested too deeply to be a recipe"),
    ("400-digit max_iter", b"merge_method: karcher\nmodels: [A, B]\nparameters:\n  max_iter: " + b"9" * 400 + b"\n",
     "parameter 'max_iter': an integer of about 400 digits is out of range"),
    ("5000-digit integer", b"merge_method: linear\nmodels: [A]\nparameters: {weight: " + b"9" * 5000 + b"}\n",
     r"not valid YAML \(Exceeds the limit"),
    ("filter: 5", b"merge_method: linear\nmodels:\n  - model: A\n    parameters:\n      weight: [{filter: 5, value: 1}]\n",
     "filter 5 is not a piece of a tensor name; write it as a string"),
    ("a date as dtype", b"merge_method: linear\nmodels: [A]\ndtype: 2024-01-01\n",
     r"'dtype' must name a dtype \(float32, bfloat16, ...\), got date"),
    ("a list as revision", b"merge_method: linear\nmodels:\n  - model: {model: {path: org/x, revision: [1]}}\n",
     "revision must be a branch, tag or commit, got a list of 1 item: \\[1\\]"),
    ("a long method name", b"merge_method: " + b"x" * 5000 + b"\nmodels: [A]\n", "unknown method 'x{80}...'; valid"),
    ("mixed extra keys", b"merge_method: linear\nmodels:\n  - {model: A, 1: x, b: y}\n", "models\\[0\\]: unknown field 1"),
    ("a NUL in a path", b'merge_method: linear\nmodels: ["a\\0b"]\n', "model reference must be a path"),
    ("a name too long", b"merge_method: linear\nmodels: [" + b"a" * 300 + b"]\n", "neither a local path nor a Hub"),
    ("a control character", b"merge_method: linear\x07\nmodels: [A]\n", r"not valid YAML \(unacceptable character #x0007"),
    ("too large", b"merge_method: linear\nmodels: [A]\n#" + b"x" * (1 << 20) + b"\n", r"larger than 1 MiB"),
])
def test_hostile_recipes_get_the_one_line_error_of_their_class(tmp_path: Path, models, name: str, content: bytes,
                                                              message: str) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_bytes(content.replace(b"[A, B]", f"[{models[0]}, {models[1]}]".encode())
                       .replace(b"[A]", f"[{models[0]}]".encode()).replace(b"model: A", f"model: {models[0]}".encode()))
    with pytest.raises(MergeError, match=message) as e:
        load_recipe(recipe)
    assert isinstance(e.value, (InvalidArgumentError, CheckpointNotFoundError, UnknownNameError)) and "\n" not in str(e.value)
    code, output = _run(recipe, tmp_path / "o.safetensors")
    assert code in (1, 2) and output.startswith("error: ") and output.count("\n") == 1 and len(output) < 500, output
    assert "this is a bug" not in output and not (tmp_path / "o.safetensors").exists()


def test_a_recipe_reusing_values_by_alias_still_runs(tmp_path: Path, models) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {models[0]}\n    parameters: &p {{weight: 3.0}}\n"
                      f"  - model: {models[1]}\n    parameters: *p\n")
    r = load_recipe(recipe)
    assert r.member_params == [{"weight": 3.0}, {"weight": 3.0}]
    code, output = _run(recipe, tmp_path / "o.safetensors")
    assert code == 0, output


# --- selection manifests ------------------------------------------------------------------------------------
MANIFEST = {"format": "papa-merge/selection", "format_version": 1,
            "members": [{"path": "a.safetensors", "weight": 2}, {"path": "b.safetensors", "weight": 1}],
            "picks": ["a.safetensors", "b.safetensors", "a.safetensors"]}


def _manifest(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sel.json"
    p.write_text(text)
    return p


def _with(path: tuple, value: str) -> str:
    """The valid manifest with the value at ``path`` replaced by the raw JSON ``value`` (1e400, null, ...)."""
    doc = json.loads(json.dumps(MANIFEST))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "@@"
    return json.dumps(doc).replace('"@@"', value)


@pytest.mark.parametrize("where,value,message", [
    (("format_version",), '"abc"', 'format_version "abc" is not a manifest format version'),
    (("format_version",), "null", "format_version null is not a manifest format version"),
    (("format_version",), "1e400", "format_version Infinity is not a manifest format version"),
    (("format_version",), "2.5", "format_version 2.5 is not a manifest format version"),
    (("members", 0, "weight"), "1e400", r'members\[0\] \("a.safetensors"\): weight Infinity is not a pick count'),
    (("members", 1, "weight"), "1.5", r'members\[1\] \("b.safetensors"\): weight 1.5 is not a pick count'),
    (("members", 1, "weight"), "true", r"weight true is not a pick count"),
    (("members", 1, "weight"), '"1"', r'weight "1" is not a pick count'),
    (("members", 1, "weight"), "0", r"weight 0 is not a pick count"),
    (("members", 1, "path"), "7", r"members\[1\] must be an object with the checkpoint's 'path', got 7"),
    (("members", 1), "[]", r"members\[1\] must be an object with the checkpoint's 'path', got an array of 0 items"),
    (("size",), "1e400", "size Infinity is not a number of members"),
    (("picks",), "{}", "'picks' must list the members"),
    (("picks", 0), '"c" ', "a malformed selection manifest \\(KeyError: 'c'\\)"),
    (("data",), "[" * 100_000 + "]" * 100_000, r"not a papa-merge selection manifest \(nested too deeply; expected"),
    (("members", 0, "path"), json.dumps("x" * 100_000), r'got "xxxx'),
])
def test_hostile_manifests_get_a_one_line_format_error(tmp_path: Path, where: tuple, value: str, message: str) -> None:
    p = _manifest(tmp_path, _with(where, value))
    with pytest.raises(CheckpointFormatError, match=message) as e:
        read_manifest(p)
    assert "\n" not in str(e.value) and len(str(e.value)) < len(str(p)) + 250
    res = CliRunner().invoke(cli, ["soup", "--weights-from", str(p), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert "this is a bug" not in res.output


def test_manifest_weights_are_pick_counts_never_rounded(tmp_path: Path) -> None:
    # 1.5 used to be read as 1 (int()) and the picks then agreed; an integral 2.0 is the count 2.
    half = _manifest(tmp_path, _with(("members", 0, "weight"), "1.5").replace(', "a.safetensors"]', "]"))
    with pytest.raises(CheckpointFormatError, match=r"members\[0\] .*weight 1.5 is not a pick count"):
        read_manifest(half)
    whole = _manifest(tmp_path, _with(("members", 0, "weight"), "2.0"))
    assert read_manifest(whole).weights == [2, 1]
    for odd in (1.5, float("inf"), float("nan"), True, "1"):
        with pytest.raises(InvalidArgumentError, match="one positive integer weight"):
            Selection(paths=["a", "b"], weights=[odd, 1], picks=[0, 1])


def test_a_full_disk_while_writing_a_manifest_names_the_output(tmp_path: Path, monkeypatch) -> None:
    real = Path.write_text

    def write_text(self, *args, **kwargs):  # the hidden temporary fills the disk
        if ".tmp-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "runs" / "sel.json"
    with pytest.raises(OSError) as e:
        write_manifest(Selection(paths=["a.safetensors"], weights=[1], picks=[0]), out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert list((tmp_path / "runs").iterdir()) == []  # no temporary left behind
