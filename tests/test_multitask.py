"""The multi-task harness (merge.multitask, papa-merge multitask) on a tiny offline pool: 2 tasks, a few steps.

The pool is built once per module (MNIST parity and sklearn digits upsampled, a 4-channel small CNN); every
figure of the table is checked against one computed here independently: each accuracy from the merged
backbone (averaged here in float64) with the task's head, each normalised accuracy from the rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from merge.data import load_dataset
from merge.errors import CheckpointFormatError, InvalidArgumentError, MismatchError, UnknownNameError
from merge.io import open_checkpoint, write_state_dict
from merge.models import SmallCNN
from merge.multitask import (
    METHODS,
    MethodSpec,
    build_pool,
    format_multitask,
    load_task,
    read_pool,
    run_multitask,
    write_pool,
)

TASKS = ("mnist-parity", "digits-28")


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool")
    build_pool(out, tasks=TASKS, seed=0, limit=64, pretrain_limit=128, eval_limit=40, epochs=1, probe_epochs=1,
               batch_size=32, model_kwargs={"width": 4})
    return out


@pytest.fixture(scope="module")
def result(pool_dir: Path):
    return run_multitask(pool_dir / "pool.json", methods=["uniform", "task_arithmetic"],
                         params={"task_arithmetic": {"lambda": 0.5}})


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as src:
        return src.state_dict()


def _accuracy(tensors: dict[str, torch.Tensor], task: str) -> float:
    """Test accuracy computed here: a SmallCNN of the task's head size, a plain loop over the test rows."""
    splits = load_task(task, seed=0, limit=64, eval_limit=40)
    net = SmallCNN(splits.num_classes, in_chans=1, width=4)
    net.load_state_dict(tensors)
    net.eval()
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    with torch.no_grad():
        pred = net(x).argmax(1).numpy()
    return float((pred == splits.test.labels).mean())


def test_rows_are_the_pools_members_and_methods(result) -> None:
    assert result.tasks == list(TASKS)
    assert [r.method for r in result.rows] == ["individual", "multi-task training", "weight averaging",
                                                "task arithmetic"]
    assert all(r.available for r in result.rows)


def test_normalized_accuracy_is_merged_over_individual_per_task_then_averaged(result) -> None:
    individual = result.rows[0].accuracy
    for row in result.rows:
        for t in TASKS:
            assert row.normalized[t] == pytest.approx(row.accuracy[t] / individual[t])
        assert row.mean_normalized == pytest.approx(np.mean([row.accuracy[t] / individual[t] for t in TASKS]))
        assert row.mean_accuracy == pytest.approx(np.mean([row.accuracy[t] for t in TASKS]))
    assert result.rows[0].normalized == {t: 1.0 for t in TASKS}


def test_each_accuracy_is_the_merged_backbone_with_the_tasks_own_head(pool_dir: Path, result) -> None:
    members = {t: _state(pool_dir / f"member-{t}.safetensors") for t in TASKS}
    base = _state(pool_dir / "base.safetensors")
    rows = {r.method: r for r in result.rows}
    for t in TASKS:
        assert rows["individual"].accuracy[t] == pytest.approx(_accuracy(members[t], t))
        joint = _state(pool_dir / f"multitask-{t}.safetensors")
        assert rows["multi-task training"].accuracy[t] == pytest.approx(_accuracy(joint, t))
    for label, merged_of in (("weight averaging", lambda k: sum(members[t][k].double() for t in TASKS) / 2),
                             ("task arithmetic", lambda k: base[k].double() + 0.5 * sum(
                                 members[t][k].double() - base[k].double() for t in TASKS))):
        for t in TASKS:
            tensors = {k: (v if k.startswith("head.") or not v.is_floating_point() else merged_of(k).float())
                       for k, v in members[t].items()}
            assert rows[label].accuracy[t] == pytest.approx(_accuracy(tensors, t)), (label, t)


def test_the_merges_record_time_and_parameters(result) -> None:
    ta = result.rows[3]
    assert ta.seconds is not None and ta.seconds > 0
    assert ta.note == "lambda=0.5"  # the override replaced the default 0.3
    assert result.rows[0].seconds is None  # nothing was merged


def test_an_unregistered_method_is_a_row_that_says_so(pool_dir: Path) -> None:
    res = run_multitask(pool_dir / "pool.json", methods=[MethodSpec("Not yet", "no_such_operator")])
    row = res.rows[-1]
    assert row.method == "Not yet" and not row.available and row.mean_accuracy is None
    assert row.note == "not available: no operator 'no_such_operator' is registered"
    assert "| Not yet | - | - | - | - | - | - | not available: no operator 'no_such_operator' is registered |" \
        in format_multitask(res)


def test_every_method_of_the_table_has_a_row(pool_dir: Path) -> None:
    res = run_multitask(pool_dir / "pool.json")
    assert [r.method for r in res.rows[2:]] == [m.label for m in METHODS]
    for r in res.rows:
        assert r.available or r.note.startswith("not available: no operator")


def test_unknown_method_names_the_choices(pool_dir: Path) -> None:
    with pytest.raises(UnknownNameError, match="tsv"):
        run_multitask(pool_dir / "pool.json", methods=["no-such-method"])


def test_a_pool_of_absolute_paths_with_heads_kept_apart_gives_the_same_table(pool_dir: Path, result,
                                                                            tmp_path: Path) -> None:
    # Heads in files of their own (as CLIP's zero-shot heads are), members holding the backbone only.
    pool = read_pool(pool_dir / "pool.json")
    members = []
    for m in pool.members:
        full = _state(pool_dir / m.checkpoint)
        body = write_state_dict({k: v for k, v in full.items() if not k.startswith("head.")},
                                tmp_path / f"body-{m.task}.safetensors")
        head = write_state_dict({k: v for k, v in full.items() if k.startswith("head.")},
                                tmp_path / f"head-{m.task}.safetensors")
        members.append(type(m)(task=m.task, checkpoint=str(body), head=str(head),
                               multitask=str(pool_dir / m.multitask)))
    moved = type(pool)(model=pool.model, base=str(pool_dir / pool.base), head=pool.head, members=tuple(members),
                       seed=pool.seed, limit=pool.limit, eval_limit=pool.eval_limit)
    write_pool(moved, tmp_path / "elsewhere.json")
    again = run_multitask(tmp_path / "elsewhere.json", methods=["uniform", "task_arithmetic"],
                          params={"task_arithmetic": {"lambda": 0.5}})
    assert [r.accuracy for r in again.rows] == [r.accuracy for r in result.rows]


def test_a_pool_of_hub_references(pool_dir: Path, result, hub) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    api.create_repo("org/pool-a", exist_ok=True)
    api.upload_folder(folder_path=str(pool_dir), repo_id="org/pool-a", allow_patterns=["*.safetensors"])
    raw = json.loads((pool_dir / "pool.json").read_text())
    raw["base"] = "hf://org/pool-a/" + raw["base"]
    for m in raw["members"]:
        m["checkpoint"] = "hf://org/pool-a/" + m["checkpoint"]
        m.pop("multitask")
    path = pool_dir.parent / "hub-pool.json"
    path.write_text(json.dumps(raw))
    res = run_multitask(path, methods=["uniform"])
    assert res.rows[0].accuracy == result.rows[0].accuracy
    assert res.rows[2].accuracy == result.rows[2].accuracy
    assert not res.rows[1].available and "no multi-task model" in res.rows[1].note


def test_tasks_are_label_and_input_transforms_of_the_real_data() -> None:
    mnist = load_dataset("mnist")
    images, labels = mnist.train.table.images, mnist.train.table.labels
    parity = load_task("mnist-parity", limit=50, eval_limit=20)
    assert parity.classes == ["even", "odd"] and set(parity.test.labels) <= {0, 1}
    rot = load_task("mnist-rot90", limit=50, eval_limit=20)
    inv = load_task("mnist-inverted", limit=50, eval_limit=20)
    # The test rows are MNIST's official test images, transformed: find each one among MNIST's.
    for splits, transform, relabel in ((parity, lambda x: x, lambda y: y % 2),
                                       (rot, lambda x: torch.rot90(x, -1, dims=(1, 2)), lambda y: y),
                                       (inv, lambda x: 255 - x, lambda y: y)):
        table = splits.test.table
        i = int(splits.test.indices[0])
        original = transform(table.images[i])
        match = [j for j in range(60000, 70000) if torch.equal(images[j], original)]
        assert match and relabel(labels[match[0]]) == table.labels[i]
    digits = load_task("digits-28", limit=50, eval_limit=20)
    assert digits.test[0][0].shape == (1, 28, 28) and digits.num_classes == 10
    # Each task is normalised by its own training images.
    x = torch.stack([inv.train[i][0] for i in range(len(inv.train))])
    assert abs(float(x.mean())) < 1e-4


@pytest.mark.parametrize("text, error, message", [
    ("not json", CheckpointFormatError, "not a JSON pool file"),
    ('{"format": "other"}', CheckpointFormatError, "its 'format' should be 'papa-merge-pool/1'"),
    ('{"format": "papa-merge-pool/1", "model": "small_cnn", "base": "b", "head": "head."}', InvalidArgumentError,
     "needs a 'members' entry"),
    ('{"format": "papa-merge-pool/1", "model": "small_cnn", "base": "b", "head": "head.", "members": '
     '[{"task": "mnist", "checkpoint": "a"}]}', InvalidArgumentError, "at least 2 members, one per task"),
    ('{"format": "papa-merge-pool/1", "model": "small_cnn", "base": "b", "head": "head.", "members": '
     '[{"task": "mnist", "checkpoint": 3}, {"task": "x", "checkpoint": "c"}]}', InvalidArgumentError,
     "member 0: 'checkpoint' is 3; it should be a str"),
])
def test_bad_pool_files_are_refused_with_what_to_fix(tmp_path: Path, text: str, error: type, message: str) -> None:
    path = tmp_path / "pool.json"
    path.write_text(text)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_pool(path)


def test_a_member_without_head_tensors_is_named(pool_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((pool_dir / "pool.json").read_text())
    raw["head"] = ["classifier."]
    raw["base"] = str(pool_dir / raw["base"])
    for m in raw["members"]:
        m["checkpoint"] = str(pool_dir / m["checkpoint"])
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(MismatchError, match=r"member 0 \(mnist-parity, .*\) holds no tensor starting with "
                                            r"\['classifier.'\]; name the head's prefix"):
        run_multitask(tmp_path / "p.json", methods=["uniform"])


def test_cli_run_prints_the_table_and_writes_json(pool_dir: Path, result, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(cli, ["multitask", "run", str(pool_dir / "pool.json"), "--methods", "uniform,task_arithmetic",
                                   "--param", "task_arithmetic.lambda=0.5", "--json", str(out)])
    assert res.exit_code == 0, res.output
    # The table as the library formats it, but for the merge's time and memory (measured again).
    printed = [line.split(" | ")[:5] for line in res.output.strip().splitlines()]
    assert printed == [line.split(" | ")[:5] for line in format_multitask(result).splitlines()]
    rows = json.loads(out.read_text())["rows"]
    assert [r["accuracy"] for r in rows] == [r.accuracy for r in result.rows]
    again = CliRunner().invoke(cli, ["multitask", "run", str(pool_dir / "pool.json"), "--methods", "uniform",
                                     "--json", str(out)])
    assert again.exit_code == 2 and f"{out} already exists; pass --force to replace it" in again.output
    assert "| method |" not in again.output  # refused before any work


def test_cli_refuses_a_malformed_param(pool_dir: Path) -> None:
    res = CliRunner().invoke(cli, ["multitask", "run", str(pool_dir / "pool.json"), "--param", "lambda=0.5"])
    assert res.exit_code == 2 and "expected OPERATOR.NAME=VALUE like ties.density=0.5, got 'lambda=0.5'" in res.output


def test_cli_build_writes_a_pool(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["multitask", "build", str(tmp_path / "p"), "--tasks", "mnist-parity,digits-28",
                                   "--limit", "32", "--pretrain-limit", "64", "--eval-limit", "20", "--epochs", "0.5",
                                   "--no-multitask"])
    assert res.exit_code == 0, res.output
    pool = read_pool(tmp_path / "p" / "pool.json")
    assert [m.task for m in pool.members] == list(TASKS) and all(m.multitask is None for m in pool.members)
    shutil.rmtree(tmp_path / "p")
