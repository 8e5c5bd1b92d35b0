"""`papa-merge soup` and `papa-merge inspect` through click's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from tests.ckpt_factory import reference, save_members


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name, command in cli.commands.items():
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0 and "Usage: " in res.output and len(command.help or "") > 20, name


def test_soup_writes_the_weighted_average(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    out = tmp_path / "soup.safetensors"
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out), "--weights", "0.5,0.3,0.2",
                                   "--accumulate", "float64", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"wrote {out} (9 tensors") and "weighted of 3 members" in res.stdout
    got = load_file(str(out))
    ref = reference(sds, [0.5, 0.3, 0.2])
    assert torch.allclose(got["classifier.weight"].double(), torch.from_numpy(ref["classifier.weight"]),
                          rtol=2**-23, atol=0)


def test_soup_dry_run_writes_nothing(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 2)
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "x"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "tensors:        9 (7 merged, 2 copied from member 0, 0 skipped)" in res.output
    assert "method:         uniform (sum of 0.5, 0.5 x member)" in res.output
    assert "peak memory:" in res.output and "for uniform (independent of member count)" in res.output
    size = sum(v.numel() * v.element_size() for v in sds[0].values())
    assert f"writes:         {size / 1000:.2f} kB" in res.output
    assert not (tmp_path / "x").exists()


def test_list_methods_has_a_header_and_one_row_per_operator() -> None:
    from merge.ops import OPERATORS

    res = CliRunner().invoke(cli, ["soup", "--list-methods"])
    lines = res.output.splitlines()
    assert res.exit_code == 0 and lines[0].split() == ["METHOD", "STREAMING", "PATH", "BASE", "MODEL"]
    assert max(map(len, lines)) <= 100  # fits a terminal: citations go on their own lines
    rows = {line.split()[0]: i for i, line in enumerate(lines) if line and not line.startswith(" ")
            and line.split()[0] in OPERATORS}
    assert sorted(rows) == sorted(OPERATORS)

    def row(name: str) -> str:
        return lines[rows[name]]

    def below(name: str) -> list[str]:  # the indented lines under the row: parameters, then the citation
        i = rows[name] + 1
        found: list[str] = []
        while i < len(lines) and lines[i].startswith("    "):
            if lines[i].startswith("      "):
                found[-1] += " " + lines[i].strip()
            else:
                found.append(lines[i].strip())
            i += 1
        return found

    assert row("weighted").startswith("weighted (alias linear)")
    assert row("ties").split()[1:] == ["task", "required"] and "density*" in below("ties")[0]
    assert row("slerp").split()[1:] == ["gram", "required"] and below("slerp")[0] == "parameters: t"
    assert row("uniform").split()[1:] == ["linear", "none"] and below("uniform")[0] == "parameters: -"
    assert below("ties")[1] == OPERATORS["ties"].citation and "Shoemake 1985" in below("slerp")[1]


def test_inspect_reports_counts_and_recipe(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 2)
    out = tmp_path / "soup.safetensors"
    CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out)])
    res = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["tensors"] == len(sds[0])
    assert info["parameters"] == sum(v.numel() for v in sds[0].values())
    assert info["dtypes"] == {"float32": sum(v.numel() for v in sds[0].values() if v.dtype == torch.float32),
                              "int64": 1, "bool": 12}
    assert info["metadata"]["papa_merge.recipe"]["method"] == "uniform"
    text = CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert "tensors:    9" in text and "classifier.weight [10, 30] float32" in text
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 1 and "no such file" in res.output


def test_torch_file_outputs_load_with_weights_only(tmp_path: Path) -> None:
    import zipfile

    paths, sds = save_members(tmp_path, 3, dtype=torch.bfloat16)
    CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "ref.safetensors")])
    ref = load_file(str(tmp_path / "ref.safetensors"))
    for suffix in (".pth", ".pt", ".bin"):
        out = tmp_path / f"averaged{suffix}"
        res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out)])
        assert res.exit_code == 0 and res.stdout.startswith(f"wrote {out} "), res.output
        for mmap in (False, True):
            sd = torch.load(out, weights_only=True, mmap=mmap)
            assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert zipfile.ZipFile(out).testzip() is None  # every record's CRC checks out
    again = tmp_path / "again.pth"
    CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(again)])
    assert again.read_bytes() == (tmp_path / "averaged.pth").read_bytes()  # reruns are bit-identical
    recipe = json.loads(zipfile.ZipFile(again).read("archive/extra/papa_merge.recipe"))
    assert recipe["method"] == "uniform" and len(recipe["members"]) == 3


def test_output_forms_and_refused_suffixes(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "soup.v2")])
    assert res.exit_code == 2 and "cannot tell what to write for suffix '.v2'" in res.output
    assert "NAME.safetensors" in res.output and "NAME.pt, NAME.pth or NAME.bin" in res.output
    assert not (tmp_path / "soup.v2").exists()
    (tmp_path / "llama-3.1").mkdir()  # an existing folder is a folder output, whatever its name
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "llama-3.1"), "--force"])
    assert res.exit_code == 0 and (tmp_path / "llama-3.1" / "model.safetensors").exists(), res.output


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # the factory's members share no start
def test_method_linear_and_task_methods_from_the_cli(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    res = CliRunner().invoke(cli, ["soup", *map(str, paths[:2]), "--method", "linear", "--weights", "3,1",
                                   "-o", str(tmp_path / "lin.safetensors")])
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "lin.safetensors"))["classifier.weight"].double()
    assert torch.allclose(got, torch.from_numpy(reference(sds[:2], [3, 1])["classifier.weight"]), rtol=1e-6, atol=1e-5)
    import merge

    res = CliRunner().invoke(cli, ["soup", *map(str, paths[1:]), "--method", "ties", "--base", str(paths[0]),
                                   "--density", "0.5,0.3", "--lambda", "0.8", "-o", str(tmp_path / "ties.safetensors")])
    assert res.exit_code == 0, res.output
    py = merge.soup(paths[1:], base=paths[0], method="ties", params={"density": [0.5, 0.3], "lambda": 0.8},
                    out=tmp_path / "ties-py.safetensors")
    assert (tmp_path / "ties.safetensors").read_bytes() == py.path.read_bytes()
    res = CliRunner().invoke(cli, ["soup", *map(str, paths[1:]), "--method", "ties", "--base", str(paths[0]),
                                   "--density", "1.5", "-o", str(tmp_path / "bad.safetensors")])
    assert res.exit_code == 2 and "parameter density of member 0 must be in [0, 1], got 1.5 (pass --density)" in res.output
    res = CliRunner().invoke(cli, ["soup", *map(str, paths[1:]), "--method", "slerp", "--base", str(paths[0]),
                                   "--t", "0.5", "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "method 'slerp' takes at most 1 member" in res.output
    res = CliRunner().invoke(cli, ["soup", str(paths[1]), "--method", "karcher", "--param", "max_iter=3",
                                   str(paths[2]), "-o", str(tmp_path / "k.safetensors"), "--dry-run"])
    assert res.exit_code == 0 and "method:         karcher (gram path; parameters {'max_iter': '3'})" in res.output
    assert "peak memory:" in res.output and "for karcher (independent of member count)" in res.output


def test_the_last_line_names_method_base_and_parameters(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 3)
    a, b, base = map(str, paths)
    res = CliRunner().invoke(cli, ["soup", a, b, "--method", "ties", "--base", base, "--density", "0.5",
                                   "-o", str(tmp_path / "t.safetensors")])
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(f": ties of 2 members on base {base} (density 0.5): {a} x0.5, {b} x0.5"), last
    # inspect tells the same recipe, with the names the recipe records (outside the working folder: file names).
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "t.safetensors")]).stdout
    assert (f"  recipe:     ties of 2 members on base {Path(base).name} (density 0.5): {Path(a).name} x0.5, "
            f"{Path(b).name} x0.5") in shown.splitlines(), shown
    res = CliRunner().invoke(cli, ["soup", a, "--method", "slerp", "--base", base, "--t", "0.3",
                                   "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith(f": slerp of 1 member on base {base} (t 0.3): {a} x1"), res.stdout


def test_dry_run_says_whether_the_output_exists(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    members = list(map(str, paths))
    out = tmp_path / "soup.safetensors"
    runner = CliRunner()

    def writes(*extra: str) -> str:
        res = runner.invoke(cli, ["soup", *members, "-o", str(out), "--dry-run", *extra])
        assert res.exit_code == 0, res.output
        return next(ln for ln in res.stdout.splitlines() if ln.startswith("writes:"))

    assert writes().endswith(f"to {out}")
    assert runner.invoke(cli, ["soup", *members, "-o", str(out)]).exit_code == 0
    assert writes().endswith("(exists: the run would be refused; pass --force to replace it)")
    assert writes("--force").endswith("(exists: a previous papa-merge output, replaced once the new one is complete)")
    out.write_bytes(b"the user's own file")
    assert "did not write" in writes("--force")
    assert out.read_bytes() == b"the user's own file"


def test_an_existing_output_is_refused_before_hub_members_are_fetched(tmp_path: Path, monkeypatch) -> None:
    # With the Hub offline, fetching hf://... would fail; the output check must come first and name the output.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    res = CliRunner().invoke(cli, ["soup", "hf://nobody/nothing", "hf://nobody/else", "-o", str(out)])
    assert res.exit_code == 1 and f"error: {out}: already exists" in res.output, res.output
    import merge

    with pytest.raises(merge.errors.OutputExistsError):
        merge.soup(["hf://nobody/nothing"], out=out)


def test_a_missing_member_is_told_before_torch_is_imported(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom cli.main import cli\n"
            f"try:\n    cli(['soup', {str(tmp_path / 'nope.safetensors')!r}, '-o', {str(tmp_path / 'o.safetensors')!r}])\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert "EXIT 1 False" in proc.stdout, (proc.stdout, proc.stderr)
    assert f"error: {tmp_path / 'nope.safetensors'}: no such file or folder" in proc.stderr


def test_soup_help_groups_its_options_and_the_top_level_groups_commands() -> None:
    res = CliRunner().invoke(cli, ["soup", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = res.output
    heads = ["Members and output:", "Merge method (see --list-methods):",
             "Greedy soup and BatchNorm (evaluate on data):", "Compute:"]
    at = [text.index(h) for h in heads]
    assert at == sorted(at)
    # Each option sits in its section: --density among the method's, --recompute-bn among the evaluation's.
    assert at[1] < text.index("\n  --density") < at[2] < text.index("\n  --recompute-bn") < at[3]
    assert "[MEMBERS]...\n" not in text.split("Other options:")[-1]  # arguments are in the usage line only
    assert "[default: 1, keep all]" in text and "[required by slerp]" in text
    top = CliRunner().invoke(cli, ["--help"]).output
    sections = ["Merge commands:", "Train commands:", "Evaluate commands:", "Hugging Face Hub commands:"]
    assert [top.index(s) for s in sections] == sorted(top.index(s) for s in sections)
    assert top.index("Merge commands:") < top.index("  soup ") < top.index("Train commands:") < top.index("  train ")
    listed = {line.split()[0] for line in top.split("Merge commands:")[1].splitlines() if line.startswith("  ")}
    assert listed == set(cli.commands)  # every command appears once, in some section


def test_a_pattern_that_matched_nothing_is_told_as_such(tmp_path: Path) -> None:
    # The shell passes `pool/*.safetensors` on as it is when nothing matches.
    pattern = str(tmp_path / "pool" / "*.safetensors")
    for command in (["soup", pattern, "-o", str(tmp_path / "o.safetensors")], ["eval", pattern]):
        res = CliRunner().invoke(cli, command)
        assert res.exit_code == 1 and f"error: {pattern}: the pattern matched no file" in res.output, res.output
    assert not (tmp_path / "o.safetensors").exists()
