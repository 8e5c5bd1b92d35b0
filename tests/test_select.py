"""Greedy ensemble selection against a port of the reference, selection manifests, and `papa-merge select`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import merge
from cli.main import cli
from merge.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError, OutputExistsError
from merge.evaluate import CheckpointEvaluator, evaluate_checkpoints
from merge.greedy import ensemble_selection, greedy_ensemble_selection, select_checkpoints
from merge.manifest import Selection, is_manifest, read_manifest, selection_from_picks, write_manifest
from tests.eval_fixtures import one_thread, train_digit_members

# --------------------------------------------------------------------------------------------------
# The reference: ``greedy_selection`` of google/uncertainty-baselines, baselines/cifar/hyperdeepensemble.py,
# ported line by line to numpy (float64). It stops when the ensemble holds max_ens_size DISTINCT members,
# keeps best_objective across rounds, and takes a candidate only if it beats it strictly (the first such
# index wins ties). Our one deliberate difference: for 'acc' the objective is -acc (the reference minimises
# acc, which would select the worst members).


def reference_greedy_selection(val_probs: list[np.ndarray], val_labels: np.ndarray, max_ens_size: int,
                               objective: str = "nll") -> list[int]:
    def ensemble_scores(probs_list: list[np.ndarray]) -> tuple[float, float]:
        probs = np.mean(probs_list, axis=0)
        acc = float(np.mean(np.argmax(probs, axis=1) == val_labels))
        nll = float(-np.mean(np.log(probs[np.arange(len(val_labels)), val_labels])))
        return acc, nll

    get_objective = (lambda acc, nll: nll) if objective == "nll" else (lambda acc, nll: -acc)
    best_objective = np.inf
    ens: list[int] = []
    while len(set(ens)) < max_ens_size:
        current = [val_probs[i] for i in ens]
        best_model_id = None
        for model_id, probs in enumerate(val_probs):
            acc, nll = ensemble_scores(current + [probs])
            obj = get_objective(acc, nll)
            if obj < best_objective:
                best_objective = obj
                best_model_id = model_id
        if best_model_id is None:
            break
        ens.append(best_model_id)
    return ens


def old_rule(val_probs: list[np.ndarray], y: np.ndarray, size: int) -> list[int]:
    """What greedy_ensemble_selection did before: stop after `size` picks (not distinct members)."""
    best, picks = np.inf, []
    while len(picks) < size:
        nlls = [float(-np.mean(np.log(np.mean([val_probs[i] for i in picks] + [p], axis=0)[np.arange(len(y)), y])))
                for p in val_probs]
        j = int(np.argmin(nlls))
        if nlls[j] >= best:
            break
        best = nlls[j]
        picks.append(j)
    return picks


def random_pool(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """A pool of members of mixed quality and confidence on one labelled set (like a random search's)."""
    m, n, c = int(rng.integers(3, 11)), int(rng.integers(40, 160)), int(rng.integers(2, 6))
    y = rng.integers(0, c, n)
    truth = np.eye(c)[y] * rng.uniform(0.5, 3.0)
    probs = []
    for _ in range(m):
        logits = truth * rng.uniform(0.0, 1.5) + rng.normal(0, rng.uniform(0.5, 2.5), (n, c))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    return probs, y


def test_selection_equals_the_reference_on_200_random_pools() -> None:
    rng = np.random.default_rng(2020)
    differs_from_old = 0
    repeats = 0
    for trial in range(200):
        probs, y = random_pool(rng)
        size = 2 + trial % 4  # sizes 2..5
        want = reference_greedy_selection(probs, y, size)
        got = ensemble_selection([torch.from_numpy(p) for p in probs], torch.from_numpy(y), size=size)
        assert got.picks == want, (trial, size, got.picks, want)
        assert greedy_ensemble_selection([torch.from_numpy(p) for p in probs], torch.from_numpy(y), size=size) == want
        assert len(set(want)) <= size
        assert got.stopped == ("size" if len(set(want)) == size else "no improvement")
        assert got.counts == [want.count(i) for i in got.members] and sum(got.counts) == len(want)
        # The recorded NLL is the final ensemble's, computed independently.
        if want:
            ens = np.mean([probs[i] for i in want], axis=0)
            assert got.nll == pytest.approx(float(-np.mean(np.log(ens[np.arange(len(y)), y]))), rel=1e-12)
        differs_from_old += old_rule(probs, y, size) != want
        repeats += len(want) > len(set(want))
    # The pools exercise what the fix is about: picks with replacement past k picks, and a different answer
    # from the old stop-after-k-picks rule in a good share of them.
    assert differs_from_old >= 10 and repeats >= 20, (differs_from_old, repeats)


def test_selection_by_accuracy_equals_the_reference_maximising_accuracy() -> None:
    rng = np.random.default_rng(7)
    for trial in range(100):
        probs, y = random_pool(rng)
        size = 2 + trial % 4
        want = reference_greedy_selection(probs, y, size, objective="acc")
        got = ensemble_selection([torch.from_numpy(p) for p in probs], torch.from_numpy(y), size=size, by="acc")
        assert got.picks == want, (trial, got.picks, want)


def test_selection_bad_input() -> None:
    p = torch.full((3, 2), 0.5)
    with pytest.raises(InvalidArgumentError, match="by must be one of nll, acc; got 'ece'"):
        ensemble_selection([p], torch.zeros(3), size=1, by="ece")
    with pytest.raises(InvalidArgumentError, match="max_picks must be at least 1"):
        ensemble_selection([p], torch.zeros(3), size=1, max_picks=0)
    with pytest.raises(InvalidArgumentError, match="no members given"):
        ensemble_selection([], torch.zeros(3), size=1)


def test_max_picks_bounds_the_loop() -> None:
    # Without a bound these picks go [0, 1, 0] and stop (no improvement); a bound of 2 stops them earlier.
    y = torch.tensor([0, 0, 1])
    p0 = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2]])
    p1 = torch.tensor([[0.3, 0.7], [0.3, 0.7], [0.05, 0.95]])
    full = ensemble_selection([p0, p1], y, size=6)
    assert full.picks == [0, 1, 0] and full.stopped == "no improvement" and full.counts == [2, 1]
    r = ensemble_selection([p0, p1], y, size=6, max_picks=2)
    assert r.picks == [0, 1] and r.stopped == "max picks"


# --------------------------------------------------------------------------------------------------
# Manifests

def test_manifest_round_trips(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    pool = [str(tmp_path / "pool" / f"m{i}.safetensors") for i in range(4)]
    sel = selection_from_picks(pool, [2, 0, 2, 3, 2], by="nll", size=3, scores={"val": {"acc": 0.9, "nll": 0.3,
                                                                                          "ece": 0.02}},
                               member_scores=[{"val": {"acc": 0.8, "nll": 0.5, "ece": 0.1}}] * 3,
                               pool_scores=[{"val": {"acc": 0.1 * i, "nll": 1.0, "ece": 0.0}} for i in range(4)],
                               steps=[{"member": pool[i], "acc": 0.5, "nll": 1.0} for i in [2, 0, 2, 3, 2]],
                               stopped="size", data={"dataset": "digits", "seed": 0})
    assert sel.paths == [pool[2], pool[0], pool[3]] and sel.weights == [3, 1, 1] and sel.picks == [0, 1, 0, 2, 0]
    out = write_manifest(sel, tmp_path / "runs" / "sel.json")
    assert is_manifest(out) and not is_manifest(tmp_path / "nope.json")
    doc = json.loads(out.read_text())
    # Stored relative to the manifest's folder, so the run folder can move as a whole.
    assert [m["path"] for m in doc["members"]] == ["../pool/m2.safetensors", "../pool/m0.safetensors",
                                                   "../pool/m3.safetensors"]
    assert [m["weight"] for m in doc["members"]] == [3, 1, 1]
    back = read_manifest(out)
    for field in ("weights", "picks", "by", "size", "split", "scores", "member_scores", "pool_scores", "stopped",
                  "data"):
        assert getattr(back, field) == getattr(sel, field), field
    assert [Path(p).resolve() for p in back.paths] == [Path(p).resolve() for p in sel.paths]
    assert [Path(p).resolve() for p in back.pool] == [Path(p).resolve() for p in pool]
    assert [Path(s["member"]).resolve() for s in back.steps] == [Path(pool[i]).resolve() for i in [2, 0, 2, 3, 2]]
    with pytest.raises(OutputExistsError, match="already exists"):
        write_manifest(sel, out)
    assert write_manifest(sel, out, force=True) == out and read_manifest(out).weights == sel.weights
    # force replaces a previous manifest, never another file; nothing temporary is left behind.
    other = tmp_path / "runs" / "config.json"
    other.write_text('{"model_type": "bert"}')
    with pytest.raises(OutputExistsError, match="is not a selection manifest; force replaces only a previous"):
        write_manifest(sel, other, force=True)
    assert other.read_text() == '{"model_type": "bert"}'
    assert sorted(q.name for q in (tmp_path / "runs").iterdir()) == ["config.json", "sel.json"]


def test_manifest_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="one positive integer weight"):
        Selection(paths=["a", "b"], weights=[1], picks=[0, 1])
    with pytest.raises(InvalidArgumentError, match=r"picks \[0, 0\] do not match the weights \[1, 1\]"):
        Selection(paths=["a", "b"], weights=[1, 1], picks=[0, 0])
    sel = Selection(paths=["a.safetensors"], weights=[1], picks=[0])
    with pytest.raises(InvalidArgumentError, match="end the path in .json"):
        write_manifest(sel, tmp_path / "sel.txt")
    with pytest.raises(CheckpointNotFoundError, match="no such selection manifest"):
        read_manifest(tmp_path / "missing.json")
    other = tmp_path / "config.json"
    other.write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointFormatError, match="not a papa-merge selection manifest"):
        read_manifest(other)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "papa-merge/selection", "members": [{"path": "a"}], "picks": ["a"]}))
    with pytest.raises(CheckpointFormatError, match=r'members\[0\] \("a"\): weight null is not a pick count'):
        read_manifest(broken)
    broken.write_text(json.dumps({"format": "papa-merge/selection", "members": [{"path": "a", "weight": 1}],
                                  "picks": ["b"]}))
    with pytest.raises(CheckpointFormatError, match="malformed selection manifest"):
        read_manifest(broken)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": "papa-merge/selection", "format_version": 99}))
    with pytest.raises(CheckpointFormatError, match="newer than this papa-merge reads"):
        read_manifest(future)


# --------------------------------------------------------------------------------------------------
# On real members: select, eval the manifest, soup from it

@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    with one_thread():
        paths, _ = train_digit_members(tmp_path_factory.mktemp("select-members"), 4)
    return paths


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_select_eval_and_soup_from_a_manifest(members: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "sel.json"
    res = CliRunner().invoke(cli, ["select", *map(str, members), "--size", "2", "-o", str(out), "--batch-size", "64",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    sel = read_manifest(out)
    # Independently: each member's val probabilities, the reference selection on them, the weighted ensemble.
    ev = CheckpointEvaluator.from_checkpoints(members, batch_size=64)
    logits = [ev.logits(merge.open_checkpoint(p).state_dict(), "val")[0].double().numpy() for p in members]
    probs = [_softmax(z) for z in logits]
    y = np.asarray(ev.splits.val.labels)
    want = reference_greedy_selection(probs, y, 2)
    assert sel.picks == [sorted(set(want), key=want.index).index(i) for i in want]
    assert [Path(p).name for p in sel.paths] == [members[i].name for i in sorted(set(want), key=want.index)]
    assert sel.weights == [want.count(i) for i in sorted(set(want), key=want.index)]
    ens = np.mean([probs[i] for i in want], axis=0)
    assert sel.scores["val"]["nll"] == pytest.approx(float(-np.mean(np.log(ens[np.arange(len(y)), y]))), rel=1e-9)
    assert f"ensemble (weights = pick counts): val acc {100 * sel.scores['val']['acc']:.2f}%" in res.output
    assert f"wrote {out}" in res.output and "pick 1:" in res.output
    # The same selection from Python, without writing.
    again = select_checkpoints(members, size=2, batch_size=64)
    assert again.picks == sel.picks and again.weights == sel.weights

    # eval MANIFEST: its members, then the ensemble weighted by the pick counts (test split too).
    rows = evaluate_checkpoints([out], batch_size=64)
    assert [r.kind for r in rows][-1] == "selection"
    sel_row = rows[-1]
    for split in ("val", "test"):
        x_logits = [ev.logits(merge.open_checkpoint(p).state_dict(), split)[0].double().numpy() for p in sel.paths]
        labels = np.asarray(getattr(ev.splits, split).labels)
        p = sum(w * _softmax(z) for w, z in zip(sel.weights, x_logits)) / sum(sel.weights)
        assert sel_row.metrics[split]["acc"] == pytest.approx(float(np.mean(p.argmax(1) == labels)), abs=1e-12)
        assert sel_row.metrics[split]["nll"] == pytest.approx(
            float(-np.mean(np.log(p[np.arange(len(labels)), labels]))), rel=1e-6)
    assert sel_row.metrics["val"]["nll"] == pytest.approx(sel.scores["val"]["nll"], rel=1e-6)
    res = CliRunner().invoke(cli, ["eval", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert any(line.startswith(f"sel.json: {len(sel.paths)} members, weights") for line in res.output.splitlines())

    # soup --weights-from MANIFEST: the weighted soup of the same members, tensor for tensor.
    soup_out = tmp_path / "s.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--weights-from", str(out), "-o", str(soup_out), "--no-progress"])
    assert res.exit_code == 0, res.output
    want_sd = merge.average(sel.paths, weights=sel.weights)
    got = merge.open_checkpoint(soup_out).state_dict()
    assert all(torch.equal(got[k], want_sd[k]) for k in want_sd)
    recipe = json.loads(merge.read_safetensors_metadata(soup_out)["papa_merge.recipe"])
    assert recipe["selection"]["weights"] == sel.weights and recipe["method"] == "weighted"
    bad = CliRunner().invoke(cli, ["soup", str(members[0]), "--weights-from", str(out), "-o", str(tmp_path / "x.st")])
    assert bad.exit_code == 2 and "--weights-from names the members and their weights" in bad.output
    missing = CliRunner().invoke(cli, ["soup", "-o", str(tmp_path / "y.safetensors")])
    assert missing.exit_code == 2 and "Missing argument 'MEMBERS...'" in missing.output


def test_select_bad_input(members: list[Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="end the path in .json"):
        select_checkpoints(members, size=2, out=tmp_path / "sel.yaml")
    with pytest.raises(InvalidArgumentError, match="size must be at least 1"):
        select_checkpoints(members, size=0)
    res = CliRunner().invoke(cli, ["select", *map(str, members), "--size", "2", "--by", "ece", "-o", "s.json"])
    assert res.exit_code == 2 and "'ece' is not one of 'nll', 'acc'" in res.output
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    res = CliRunner().invoke(cli, ["select", *map(str, members), "--size", "2", "-o", str(taken)])
    assert res.exit_code == 1 and "already exists" in res.output and "pass --force" in res.output


def test_select_says_a_pattern_matched_nothing(tmp_path: Path) -> None:
    # An unmatched glob reaches papa-merge as it is: it is no "pool: 1 checkpoints", nor a plain missing file.
    pattern = str(tmp_path / "pool" / "*.safetensors")
    res = CliRunner().invoke(cli, ["select", pattern, "--size", "2", "-o", str(tmp_path / "s.json")])
    assert res.exit_code == 1 and res.output == (f"error: {pattern}: the pattern matched no file (the shell passes a "
                                                 "pattern that matches nothing on as it is); check the folder and the "
                                                 "pattern\n")
    res = CliRunner().invoke(cli, ["select", str(tmp_path / "a.safetensors"), "--size", "2", "-o", "s.json"])
    assert res.exit_code == 1 and res.output == f"error: {tmp_path / 'a.safetensors'}: no such file or folder\n"


def test_select_on_a_full_disk_names_the_manifest(members: list[Path], tmp_path: Path, monkeypatch) -> None:
    import errno

    real = Path.write_text

    def write_text(self, *args, **kwargs):  # the manifest's hidden temporary fills the disk
        if self.name.startswith(".sel.json.") and ".tmp-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "sel.json"
    res = CliRunner().invoke(cli, ["select", *map(str, members), "--size", "2", "-o", str(out), "--batch-size", "64",
                                   "--no-progress"])
    assert res.exit_code == 1, res.output
    assert res.output.splitlines()[-1] == f"error: no space left on the device ({out}); free space or write the output " \
                                          "elsewhere"
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_of_a_255_byte_name_is_written_and_leaves_no_temporary(tmp_path):
    from merge.manifest import Selection, read_manifest, write_manifest

    sel = Selection(paths=["a.safetensors", "b.safetensors"], weights=[2, 1], picks=[0, 1, 0], size=2)
    out = tmp_path / ("m" * 250 + ".json")  # 255 bytes: the largest legal name
    assert write_manifest(sel, out) == out
    assert read_manifest(out).weights == [2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    write_manifest(sel, out, force=True)  # replaces its own manifest
    (tmp_path / "other.json").write_text("{}")
    import pytest

    from merge.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        write_manifest(sel, tmp_path / "other.json", force=True)  # never a file that is no manifest
    assert (tmp_path / "other.json").read_text() == "{}"
