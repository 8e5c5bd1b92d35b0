"""Window merges during training (issue 24, part 2): the transformers Trainer callback and papa-merge's own loop
write, beside each saved checkpoint, the merge ``papa-merge soup --schedule`` writes from the same checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from cli.main import cli
from merge.callbacks import WindowMergeCallback, WindowMergeLoopCallback, WindowMergeWarning, WindowMerger
from merge.keys import RECIPE_KEY

transformers = pytest.importorskip("transformers")


def _recipe(path: Path) -> dict:
    f = path / "model.safetensors" if path.is_dir() else path
    with safe_open(str(f), "pt") as h:
        return json.loads(h.metadata()[RECIPE_KEY])


def _same_tensors(a: Path, b: Path) -> None:
    ta = load_file(str(a / "model.safetensors" if a.is_dir() else a))
    tb = load_file(str(b / "model.safetensors" if b.is_dir() else b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _cli_window(members: list[Path], out: Path, *args: str) -> None:
    res = CliRunner().invoke(cli, ["soup", *map(str, members), *args, "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output


def test_trainer_callback_writes_the_clis_window_merge(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (16, 8))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, save_steps=2,
                                          per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, logging_steps=100, disable_tqdm=True, save_only_model=True)
    callback = WindowMergeCallback(schedule="ema:0.5", window=2, keep=None)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    run = tmp_path / "run"
    assert [p.name for p in callback.merger.written] == ["window-2", "window-4", "window-6"]
    assert not callback.merger.errors
    # The same window from the command line: the same tensors, the same recorded window.
    _cli_window([run / "checkpoint-2", run / "checkpoint-4", run / "checkpoint-6"], tmp_path / "cli",
                "--schedule", "ema:0.5", "--window", "2")
    _same_tensors(run / "window-6", tmp_path / "cli")
    assert _recipe(run / "window-6")["window"] == _recipe(tmp_path / "cli")["window"]
    assert _recipe(run / "window-6")["window"]["steps"] == [4, 6]
    assert (run / "window-6" / "config.json").is_file()  # a model folder from_pretrained loads


def test_loop_callback_saves_checkpoints_and_writes_the_clis_window_merge(tmp_path: Path) -> None:
    from merge.train.loop import fit
    from merge.train.recipe import Recipe

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 4 steps per epoch
    cb = WindowMergeLoopCallback(tmp_path / "run", save_steps=2, schedule="cosine", keep=1)
    fit([model], [loader], [Recipe(epochs=1.25, batch_size=8, lr=0.1)], num_classes=3, callbacks=[cb])
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5", "window-5"]
    ckpts = [run / f"checkpoint-{s}" for s in (2, 4, 5)]
    _cli_window(ckpts, tmp_path / "cli.safetensors", "--schedule", "cosine")
    _same_tensors(run / "window-5", tmp_path / "cli.safetensors")
    rec = _recipe(run / "window-5")["window"]
    assert rec["steps"] == [2, 4, 5] and rec["step_sources"] == ["metadata"] * 3
    # the last checkpoint is the model as training left it
    assert torch.equal(load_file(str(run / "checkpoint-5" / "model.safetensors"))["weight"], model.weight.detach())


def test_a_failed_merge_warns_and_training_goes_on(tmp_path: Path) -> None:
    merger = WindowMerger(schedule="uniform", background=False)
    a = tmp_path / "checkpoint-1"
    a.mkdir()
    (a / "trainer_state.json").write_text('{"global_step": 1}')  # no weights: the merge cannot open it
    with pytest.warns(WindowMergeWarning, match="no weight|not a|no such"):
        merger.submit([a], tmp_path / "w")  # opened in the trainer's thread: warned there, not raised
    b = tmp_path / "m-1.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(b))
    merger = WindowMerger(schedule="uniform", background=True)
    with pytest.warns(WindowMergeWarning, match="training goes on without it"):
        merger.submit([b], tmp_path / "out.unknown-suffix")
        merger.wait()
    assert len(merger.errors) == 1 and not (tmp_path / "w").exists()


@pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")  # huggingface_hub's upload, not ours
def test_loop_callback_pushes_each_merge_to_the_hub(hub, tmp_path: Path) -> None:
    from merge.train.loop import fit
    from merge.train.recipe import Recipe

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    cb = WindowMergeLoopCallback(tmp_path / "run", save_steps=2, push_to="org/run-window",
                                 push_options={"token": False})
    fit([model], [loader], [Recipe(epochs=2, batch_size=8, lr=0.1)], num_classes=3, callbacks=[cb])
    assert len(cb.merger.pushed) == 2 and not cb.merger.errors
    pushed = hub.read_file("org/run-window", "model.safetensors")
    assert pushed == (tmp_path / "run" / "window-4" / "model.safetensors").read_bytes()
