"""The command group: quick answers without torch, short help, -V, -q/-v, shell completion, lazy ``merge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import cli.util as util
from cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter at the repository root (imports are what is being tested)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _cli_then_modules(*args: str) -> str:
    """Code that runs ``papa-merge ARGS`` in-process, then prints which heavy modules it imported."""
    return ("import sys\nfrom cli.main import cli\n"
            f"try:\n    cli({list(args)!r}, prog_name='papa-merge')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('EXIT', code)\n"
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'safetensors', 'transformers', 'timm', "
            "'huggingface_hub') if m in sys.modules))\n")


def _heavy(out: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith("HEAVY "))
    return eval(line.removeprefix("HEAVY "))  # our own printed list


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["-V"], ["soup", "--help"], ["train", "--help"],
                                  ["inspect", "--help"]])
def test_help_and_version_import_no_torch(args):
    res = _run(_cli_then_modules(*args))
    assert "EXIT 0" in res.stdout, res.stdout + res.stderr
    assert _heavy(res.stdout) == [], f"papa-merge {' '.join(args)} imported {_heavy(res.stdout)}"


def test_list_methods_imports_no_torch_and_lists_every_operator():
    res = _run(_cli_then_modules("soup", "--list-methods"))
    assert "EXIT 0" in res.stdout, res.stdout + res.stderr
    assert "torch" not in _heavy(res.stdout), "soup --list-methods imported torch"
    from merge.ops import OPERATORS

    listed = {line.split()[0] for line in res.stdout.splitlines()[1:] if line and line.split()[0] in OPERATORS}
    assert listed == set(OPERATORS)


def test_version_flag_short_and_long():
    runner = CliRunner()
    for flag in ("-V", "--version"):
        res = runner.invoke(cli, [flag], prog_name="papa-merge")
        assert res.exit_code == 0 and res.output == "papa-merge, version 0.1.0\n"


def _tiny(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {f"{prefix}conv.weight": torch.randn(4, 2, 3, 3), f"{prefix}fc.weight": torch.randn(3, 4).bfloat16(),
          f"{prefix}bn.num_batches_tracked": torch.tensor(5)}
    save_file(sd, str(path), metadata={"papa_merge.recipe": json.dumps({"method": "uniform", "members": [1, 2]}),
                                       "note": "plain"})
    return sd


def test_inspect_of_safetensors_reads_the_header_without_torch(tmp_path):
    _tiny(tmp_path / "m.safetensors")
    res = _run(_cli_then_modules("inspect", str(tmp_path / "m.safetensors"), "--json"))
    assert "EXIT 0" in res.stdout, res.stdout + res.stderr
    assert _heavy(res.stdout) == []
    summary = json.loads(res.stdout[:res.stdout.index("EXIT")])
    assert summary["tensors"] == 3 and summary["parameters"] == 72 + 12 + 1
    assert summary["dtypes"] == {"float32": 72, "bfloat16": 12, "int64": 1}
    assert summary["bytes"] == 72 * 4 + 12 * 2 + 8
    assert summary["metadata"]["papa_merge.recipe"] == {"method": "uniform", "members": [1, 2]}


def _torch_summary(path, **kw):
    """What the torch path (open_checkpoint) reports, for comparison with the header-only one."""
    import merge.inspect as mi

    real = mi._inspect_safetensors
    mi._inspect_safetensors = lambda *a, **k: None
    try:
        return mi.inspect_checkpoint(path, **kw)
    finally:
        mi._inspect_safetensors = real


def test_header_only_summary_equals_the_torch_one(tmp_path):
    from merge.inspect import inspect_checkpoint

    _tiny(tmp_path / "m.safetensors", prefix="module.")  # names are normalised the same way
    folder = tmp_path / "folder"
    folder.mkdir()
    _tiny(folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    a = {"a.weight": torch.randn(3, 3), "a.bias": torch.randn(3)}
    b = {"b.weight": torch.randn(5, 2).half()}
    save_file(a, str(sharded / "model-00001-of-00002.safetensors"), metadata={"k": "v"})
    save_file(b, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for path in (tmp_path / "m.safetensors", folder, sharded, sharded / "model.safetensors.index.json"):
        quick, slow = inspect_checkpoint(path, top=2), _torch_summary(path, top=2)
        assert quick == slow, path
    assert inspect_checkpoint(sharded).format == "sharded" and inspect_checkpoint(sharded).tensors == 3


def test_header_only_inspect_refuses_a_truncated_file_like_the_torch_path(tmp_path):
    from merge.errors import CheckpointFormatError
    from merge.inspect import inspect_checkpoint

    _tiny(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    for summarise in (inspect_checkpoint, _torch_summary):
        with pytest.raises(CheckpointFormatError, match=r"cut\.safetensors: truncated: tensor .fc\.weight. ends at"):
            summarise(tmp_path / "cut.safetensors")


def test_import_merge_is_light_and_its_names_resolve_on_use():
    res = _run("import sys, merge\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
               "import merge.io.schemes as s\nprint(s.registered_schemes())\n"
               "print(callable(merge.soup), merge.__version__, 'torch' in sys.modules)\n"
               "print(set(merge.__all__) <= set(dir(merge)))\n"
               "try:\n    merge.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "[]"  # import merge alone imports neither torch nor numpy
    assert lines[1] == "['hf']"  # hf:// references work before merge.hub is imported
    assert lines[2] == "True 0.1.0 False"  # merge.soup imports no torch either: CPU soups may run on numpy (issue 22)
    assert lines[3] == "True"
    assert lines[4] == "module 'merge' has no attribute 'no_such_name'"


def _commands() -> dict[str, click.Command]:
    return dict(cli.commands)


def test_every_command_has_a_short_complete_summary():
    long = {n: c.help.splitlines()[0] for n, c in _commands().items() if len(c.help.splitlines()[0]) > 40}
    assert not long, f"first help lines over 40 characters (cut in `papa-merge --help`): {long}"
    res = CliRunner().invoke(cli, ["--help"], prog_name="papa-merge", terminal_width=80)
    listed = res.output[res.output.index("Merge commands:"):]
    for name, command in _commands().items():
        first = command.help.splitlines()[0].strip()
        assert first.endswith("."), (name, first)
        assert f"  {name}" in listed and first in listed, (name, first)
    assert "..." not in listed


def test_quiet_and_verbose_set_the_level_every_command_reads():
    seen = {}

    @cli.command("probe-verbosity", hidden=True)
    @click.option("--progress/--no-progress", default=None)
    def probe(progress):
        seen.update(level=util.verbosity(), bars=util.show_progress(progress),
                    hub_bars_off=os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
        util.say("normal line")
        util.say("verbose line", level=util.VERBOSE)

    try:
        runner = CliRunner()
        cases = [([], 0, False, "normal line\n"), (["-q"], -1, False, ""), (["-v"], 1, False, "normal line\nverbose line\n"),
                 (["-vv"], 2, False, "normal line\nverbose line\n")]
        for flags, level, bars, err in cases:
            res = runner.invoke(cli, [*flags, "probe-verbosity"])
            assert res.exit_code == 0, res.output
            hub_bars_off = "1" if flags == ["-q"] else os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
            assert seen == {"level": level, "bars": bars, "hub_bars_off": hub_bars_off} and res.stderr == err, flags
        # -q silenced huggingface_hub's bars for that command only.
        assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1" or hub_bars_off == "1"
        # An explicit --progress of the command wins over -q (and over "not a terminal").
        runner.invoke(cli, ["-q", "probe-verbosity", "--progress"])
        assert seen["bars"] is True
        res = runner.invoke(cli, ["-q", "-v", "probe-verbosity"])
        assert res.exit_code == 2 and "-q (quiet) and -v (verbose) contradict each other; pass one of them" in res.stderr
    finally:
        cli.commands.pop("probe-verbosity")
    # Outside any command (library use of the helpers) the level is normal.
    assert util.verbosity() == util.NORMAL and util.show_progress(True) is True


def test_bars_default_to_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert util.show_progress(None) is True and util.show_progress(False) is False


def test_shell_completion_script_and_completions():
    env = {"_PAPA_MERGE_COMPLETE": "bash_source"}
    res = _run("from cli.main import main\nmain()", env=env)
    assert res.returncode == 0 and "_papa_merge_completion" in res.stdout and "complete " in res.stdout
    res = _run("from cli.main import main\nmain()",
               env={"_PAPA_MERGE_COMPLETE": "bash_complete", "COMP_WORDS": "papa-merge so", "COMP_CWORD": "1"})
    assert res.returncode == 0 and "plain,soup" in res.stdout.splitlines()


def test_output_cut_short_by_the_reader_is_not_an_error(tmp_path):
    # `papa-merge inspect x | head -1`: head closes the pipe; papa-merge stops quietly, exit 0.
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "m.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2) for i in range(2000)}, str(path))
    code = (f"import sys\nfrom cli.main import main\nsys.argv = ['papa-merge', '-v', 'inspect', {str(path)!r}]\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    _, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 0, (proc.returncode, err.decode())
    assert b"Broken pipe" not in err and b"Traceback" not in err, err.decode()


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch):
    # Shells and schedulers read 130 as "interrupted by SIGINT"; click's own Abort would exit 1 with "Aborted!".
    import merge

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "soup", interrupted)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    result = CliRunner().invoke(cli, ["soup", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 130, result.output
    assert "Aborted" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: interrupted;")


@pytest.fixture
def three_members(tmp_path):
    for i in range(3):
        save_file({"w": torch.full((4, 4), float(i))}, str(tmp_path / f"m{i}.safetensors"))
    return [str(tmp_path / f"m{i}.safetensors") for i in range(3)]


@pytest.mark.parametrize("extra, told, not_told", [
    # An operator parameter without a flag of its own: the fix is soup's --param, never a made-up --max-iter.
    (["--method", "karcher", "--param", "max_iter=-1"], "(pass --param max_iter=VALUE)", "--max-iter"),
    # Too many members for slerp: no --members flag exists on soup, so no flag is offered.
    (["--method", "slerp", "--base", "BASE"], "takes at most 1 member", "--members"),
    # An unknown parameter: the fix is to drop it, which the message says by listing the valid ones.
    (["--method", "ties", "--base", "BASE", "--param", "filter_wise=true"], "its parameters: density", "(pass"),
])
def test_error_hints_name_only_flags_the_command_has(tmp_path, three_members, extra, told, not_told):
    extra = [three_members[0] if x == "BASE" else x for x in extra]
    result = CliRunner().invoke(cli, ["soup", *three_members, *extra, "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and told in line and not_told not in line, line


def test_recipe_errors_point_into_the_recipe_not_at_flags(tmp_path, three_members):
    # `run` takes no --weights: a bad weight in a recipe is fixed in the recipe.
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n"
                      f"  - model: {three_members[0]}\n    parameters: {{weight: -1}}\n"
                      f"  - model: {three_members[1]}\n    parameters: {{weight: 1}}\n")
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code in (1, 2), result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "--weights" not in line and "--weight" not in line, line
