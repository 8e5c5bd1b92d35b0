"""Greedy soup and greedy ensemble selection: hand-built cases with known answers, and real members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import merge
from cli.main import cli
from merge.errors import InvalidArgumentError, MissingMetadataError
from merge.evaluate import CheckpointEvaluator, evaluate_checkpoints
from merge.greedy import greedy_ensemble_selection, greedy_soup, greedy_soup_checkpoints
from merge.io.writer import write_state_dict
from tests.eval_fixtures import one_thread, train_digit_members

# --------------------------------------------------------------------------------------------------
# A hand-built case. Member i carries a one-hot "id" tensor, so the average of any set S of members
# has id = indicator(S) / |S|: the score function can read S back and look its score up in a table.
# That lets the test fix every candidate's score and know the exact answer of the model-soups rule.

N = 5
MEMBER_SCORES = {0: 0.80, 1: 0.70, 2: 0.75, 3: 0.60, 4: 0.78}
# Visiting order by score: 0 (0.80), 4 (0.78), 2 (0.75), 1 (0.70), 3 (0.60).
SET_SCORES = {
    frozenset({0, 4}): 0.80,     # equal to the soup's 0.80: not strictly better, rejected
    frozenset({0, 2}): 0.82,     # better: kept
    frozenset({0, 2, 1}): 0.82,  # equal again: rejected
    frozenset({0, 2, 3}): 0.81,  # worse: rejected
    frozenset({0, 1}): 0.99,     # would win, but 1 is only ever tried with {0, 2}: never scored
}


def member(i: int) -> dict[str, torch.Tensor]:
    ident = torch.zeros(N, dtype=torch.float64)
    ident[i] = 1.0
    return {"id": ident, "w": torch.full((3,), float(i)), "steps": torch.tensor(100 + i)}


def make_score(calls: list[frozenset[int]]):
    def score(sd: dict[str, torch.Tensor]) -> float:
        s = frozenset(int(i) for i in torch.nonzero(sd["id"] > 0).flatten())
        calls.append(s)
        return MEMBER_SCORES[next(iter(s))] if len(s) == 1 else SET_SCORES[s]
    return score


def test_greedy_soup_follows_the_model_soups_rule() -> None:
    members = [member(i) for i in range(N)]
    calls: list[frozenset[int]] = []
    r = greedy_soup(members, score=make_score(calls))
    assert r.order == [0, 4, 2, 1, 3]
    assert r.selected == [0, 2]
    assert r.score == 0.82
    assert r.member_scores == [MEMBER_SCORES[i] for i in range(N)]
    # Every member scored alone, then each other member tried exactly once, in order, with the kept set.
    assert calls == [frozenset({i}) for i in range(N)] + [frozenset(s) for s in ({0, 4}, {0, 2}, {0, 2, 1}, {0, 2, 3})]
    assert [(s["member"], s["score"], s["kept"]) for s in r.steps] == [
        (4, 0.80, False), (2, 0.82, True), (1, 0.82, False), (3, 0.81, False)]
    # The soup is the uniform average of members 0 and 2; integer tensors come from the first (the best).
    torch.testing.assert_close(r.state_dict["w"], torch.full((3,), 1.0))
    torch.testing.assert_close(r.state_dict["id"], torch.tensor([0.5, 0, 0.5, 0, 0], dtype=torch.float64))
    assert int(r.state_dict["steps"]) == 100


def test_given_member_scores_are_used_and_not_recomputed() -> None:
    calls: list[frozenset[int]] = []
    r = greedy_soup([member(i) for i in range(N)], score=make_score(calls),
                    member_scores=[MEMBER_SCORES[i] for i in range(N)])
    assert r.selected == [0, 2] and len(calls) == N - 1
    with pytest.raises(InvalidArgumentError, match="2 member_scores for 5 members"):
        greedy_soup([member(i) for i in range(N)], score=make_score([]), member_scores=[0.1, 0.2])
    with pytest.raises(InvalidArgumentError, match=r"members \[1\] scored \[nan\]"):
        greedy_soup([member(0), member(1)], score=make_score([]), member_scores=[0.5, float("nan")])
    with pytest.raises(InvalidArgumentError, match="no members given"):
        greedy_soup([], score=make_score([]))


def test_ties_keep_the_given_order_and_one_member_is_its_own_soup() -> None:
    r = greedy_soup([member(1), member(0)], score=lambda sd: 0.5)
    assert r.order == [0, 1] and r.selected == [0]  # equal scores: the first given is visited first
    single = greedy_soup([member(3)], score=lambda sd: 0.1)
    assert single.selected == [0] and single.steps == [] and torch.equal(single.state_dict["w"], member(3)["w"])


def test_paths_and_state_dicts_give_the_same_soup(tmp_path: Path) -> None:
    members = [member(i) for i in range(N)]
    paths = [write_state_dict(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(members)]
    a = greedy_soup(paths, score=make_score([]))
    b = greedy_soup(members, score=make_score([]))
    assert a.selected == b.selected == [0, 2]
    for k in b.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    # The scored soup is, bit for bit, what merge.soup writes from the kept members.
    written = merge.soup([paths[i] for i in a.selected], out=tmp_path / "s.safetensors").path
    for k, v in merge.open_checkpoint(written).state_dict().items():
        assert torch.equal(v, a.state_dict[k]), k
    record = a.record([p.name for p in paths], metric="val acc")
    assert record["ingredients"] == ["m0.safetensors", "m2.safetensors"]
    assert record["order"] == ["m0.safetensors", "m4.safetensors", "m2.safetensors", "m1.safetensors", "m3.safetensors"]
    json.dumps(record)


# --------------------------------------------------------------------------------------------------
# Greedy ensemble selection

def nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def test_ensemble_selection_on_a_known_case() -> None:
    y = torch.tensor([0, 1])
    p0 = torch.tensor([[0.95, 0.05], [0.7, 0.3]])  # NLL 0.628: best alone
    p1 = torch.tensor([[0.3, 0.7], [0.1, 0.9]])    # NLL 0.655
    p2 = torch.tensor([[0.5, 0.5], [0.5, 0.5]])    # NLL 0.693
    # {0,1}: 0.490 < 0.628; then {0,1,0}: 0.502, {0,1,1}: 0.509, {0,1,2}: 0.542 all worse: stop.
    assert greedy_ensemble_selection([p0, p1, p2], y, size=5) == [0, 1]
    assert greedy_ensemble_selection([p0, p1, p2], y, size=1) == [0]


def test_ensemble_selection_with_replacement_reweights_a_member() -> None:
    # Member 0 is right with high confidence on most examples; a 2:1 mix with member 1 beats 1:1.
    y = torch.tensor([0, 0, 1])
    p0 = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2]])    # NLL 0.607
    p1 = torch.tensor([[0.3, 0.7], [0.3, 0.7], [0.05, 0.95]])  # NLL 0.820
    # 1:1 mix 0.525, 2:1 mix 0.504; then 3:1 gives 0.508 and 2:2 gives 0.525: stop at [0, 1, 0].
    picks = greedy_ensemble_selection([p0, p1], y, size=6)
    assert picks == [0, 1, 0]
    yn = y.numpy()
    # Check every step against brute force: each pick is the best available, and each strictly improves.
    best = np.inf
    probs = [p0.double().numpy(), p1.double().numpy()]
    for t in range(1, len(picks) + 1):
        cands = [nll(np.mean([probs[i] for i in picks[:t - 1] + [j]], axis=0), yn) for j in range(2)]
        assert picks[t - 1] == int(np.argmin(cands)) and min(cands) < best
        best = min(cands)
    assert picks.count(0) > picks.count(1) >= 1  # member 0 picked again: replacement matters here
    # And the selection stops because nothing improves further.
    assert all(nll(np.mean([probs[i] for i in picks + [j]], axis=0), yn) >= best for j in range(2))
    no_rep = greedy_ensemble_selection([p0, p1], y, size=6, replacement=False)
    assert sorted(no_rep) == [0, 1] and len(set(no_rep)) == len(no_rep)


def test_ensemble_selection_rejects_bad_input() -> None:
    p = torch.full((3, 2), 0.5)
    with pytest.raises(InvalidArgumentError, match="size must be at least 1"):
        greedy_ensemble_selection([p], torch.zeros(3), size=0)
    with pytest.raises(InvalidArgumentError, match=r"member 1 has probabilities of shape \(2, 2\)"):
        greedy_ensemble_selection([p, p[:2]], torch.zeros(3), size=2)
    with pytest.raises(InvalidArgumentError, match="expected 3 labels"):
        greedy_ensemble_selection([p], torch.zeros(4), size=2)


# --------------------------------------------------------------------------------------------------
# Real members: checkpoints on disk, the model and the data rebuilt from their metadata

@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    with one_thread():
        paths, _ = train_digit_members(tmp_path_factory.mktemp("greedy-members"), 4)
    return paths


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("recompute", [0, 5])
def test_greedy_soup_checkpoints_writes_the_scored_soup(members: list[Path], tmp_path: Path, recompute: int) -> None:
    out = tmp_path / "greedy.safetensors"
    r, path = greedy_soup_checkpoints(members, out=out, recompute_bn=recompute, batch_size=64)
    assert path == out
    # Independently: each member's val accuracy as stored (as eval scores it), then the rule replayed with
    # candidate soups of two or more scored after recalibration (the model that would be written).
    ev = CheckpointEvaluator.from_checkpoints(members, batch_size=64)
    alone = [ev.scorer(recompute_bn=0)(merge.open_checkpoint(p).state_dict()) for p in members]
    assert r.member_scores == alone
    assert alone == [row.metrics["val"]["acc"] for row in evaluate_checkpoints(members, split="val", batch_size=64,
                                                                               ensemble=False)]
    assert r.order == sorted(range(len(members)), key=lambda i: -alone[i])
    kept, best = [r.order[0]], alone[r.order[0]]
    for i in r.order[1:]:
        s = ev.scorer(recompute_bn=recompute)(merge.average([members[j] for j in kept + [i]]))
        if s > best:
            kept, best = kept + [i], s
    assert r.selected == kept and r.score == best
    assert r.score >= max(alone)  # never worse than the best member on val, by construction
    # Every score says how it was obtained.
    assert r.member_label == "val acc, as stored"
    want = "as stored" if not recompute else f"after BatchNorm recomputation on {recompute} training batches of 64"
    assert r.soup_label == f"val acc, {want}"
    # The file on disk, evaluated as stored (no recalibration here), scores what greedy soup reported.
    row = evaluate_checkpoints([path], split="val", batch_size=64)[0]
    assert row.kind == "soup" and row.metrics["val"]["acc"] == r.score
    recipe = json.loads(merge.read_safetensors_metadata(path)["papa_merge.recipe"])
    assert [m["path"] for m in recipe["members"]] == [members[i].name for i in r.selected]  # never absolute
    assert recipe["greedy"]["ingredients"] == [members[i].name for i in r.selected]
    assert recipe["greedy"]["member_scores_are"] == r.member_label
    assert recipe["greedy"]["candidate_scores_are"] == r.soup_label
    assert recipe["greedy"]["soup_score_is"] == r.score_label
    many = len(r.selected) > 1
    assert recipe["greedy"]["recompute_bn_batches"] == (recompute if many else 0)
    assert ("bn_recomputed" in recipe) == bool(recompute and many)


def test_greedy_of_one_member_is_that_member(members: list[Path], tmp_path: Path) -> None:
    # A kept set of one is the member itself: same tensors (its own BatchNorm statistics, even when soups
    # of two or more are recalibrated), and the same metrics eval reports for the member.
    r, path = greedy_soup_checkpoints(members[:1], out=tmp_path / "one.safetensors", recompute_bn=5, batch_size=64)
    assert r.selected == [0] and r.steps == [] and r.score_label == "val acc, as stored"
    got = merge.open_checkpoint(path).state_dict()
    want = merge.open_checkpoint(members[0]).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    soup_row, member_row = evaluate_checkpoints([path, members[0]], batch_size=64, ensemble=False)
    assert soup_row.metrics == member_row.metrics
    assert r.score == member_row.metrics["val"]["acc"]
    recipe = json.loads(merge.read_safetensors_metadata(path)["papa_merge.recipe"])
    assert "bn_recomputed" not in recipe and recipe["greedy"]["recompute_bn_batches"] == 0


def test_greedy_needs_the_architecture_metadata(members: list[Path], tmp_path: Path) -> None:
    bare = write_state_dict(merge.open_checkpoint(members[1]).state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(MissingMetadataError, match=r"bare.safetensors: has no 'papa_merge.model' metadata"):
        greedy_soup_checkpoints([members[0], bare], out=tmp_path / "g.safetensors")
    assert not (tmp_path / "g.safetensors").exists()
    res = CliRunner().invoke(cli, ["soup", "--greedy", str(members[0]), str(bare), "-o", str(tmp_path / "g.safetensors")])
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and "bare.safetensors: has no 'papa_merge.model' metadata" in res.output
    assert "merge.greedy_soup(paths, score=...)" in res.output


def test_soup_command_greedy_and_recompute_bn(members: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "g.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--greedy", *map(str, members), "--data", "digits", "--recompute-bn", "5",
                                   "--batch-size", "64", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    r, _ = greedy_soup_checkpoints(members, out=tmp_path / "again.safetensors", data="digits", recompute_bn=5,
                                   batch_size=64)
    assert f"kept {len(r.selected)} of {len(members)}" in res.output
    assert f"{100 * r.score:.2f}%" in res.output
    # Plain uniform soup with --recompute-bn: the averaged weights, statistics recomputed.
    uni = tmp_path / "u.safetensors"
    res = CliRunner().invoke(cli, ["soup", *map(str, members), "--recompute-bn", "5", "--batch-size", "64",
                                   "-o", str(uni), "--no-progress"])
    assert res.exit_code == 0, res.output
    ev = CheckpointEvaluator.from_checkpoints(members, batch_size=64)
    want = ev.model_with(merge.average(members), recompute_bn=5).state_dict()
    got = merge.open_checkpoint(uni).state_dict()
    for k in got:
        assert torch.equal(got[k], want[k]), k
    bad = CliRunner().invoke(cli, ["soup", "--greedy", *map(str, members), "--weights", "1,1,1,1", "-o",
                                   str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "--greedy chooses its own members" in bad.output
