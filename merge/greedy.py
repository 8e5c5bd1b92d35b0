"""Greedy selection: greedy soup (weight space) and greedy ensemble selection (prediction space).

Greedy soup, exactly as model soups defines it (Wortsman et al., 2022, "Model soups: averaging
weights of multiple fine-tuned models improves accuracy without increasing inference time",
Recipe 1 and the public ``greedy_soup`` code):

1. sort the members by their held-out (validation) score, best first;
2. start the soup from the best member alone;
3. visit every other member once, in that order; add it to the soup only if the equal-weight
   average of the soup's members plus it scores *strictly* better on the held-out set than the soup.

Greedy ensemble selection (Caruana et al., 2004, "Ensemble selection from libraries of models"),
as hyperparameter ensembles use it (Wenzel et al., 2020): starting from the empty ensemble, repeatedly
add (with replacement) the member whose addition gives the lowest validation NLL of the averaged
predicted probabilities, and stop when no addition improves it or the ensemble is full.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import InvalidArgumentError
from merge.soups import average

__all__ = ["GreedyResult", "greedy_soup", "greedy_soup_checkpoints", "greedy_ensemble_selection",
           "GREEDY_CITATION", "ENSEMBLE_SELECTION_CITATION"]

GREEDY_CITATION = ("Wortsman et al., 2022. Model soups: averaging weights of multiple fine-tuned models "
                   "improves accuracy without increasing inference time. ICML.")
ENSEMBLE_SELECTION_CITATION = ("Caruana et al., 2004. Ensemble selection from libraries of models. ICML; "
                               "Wenzel et al., 2020. Hyperparameter ensembles for robustness and uncertainty "
                               "quantification. NeurIPS.")

Member = str | os.PathLike | Mapping[str, Tensor]
StateDictScore = Callable[[dict[str, Tensor]], float]


@dataclass
class GreedyResult:
    """What greedy soup chose and why.

    Attributes:
        selected: indices (into the ``members`` given) of the soup's ingredients, in the order added;
            the best member first.
        order: every member index, best validation score first (the visiting order).
        member_scores: each member's score, indexed like ``members``.
        score: the held-out score of the final soup (equals ``member_scores[selected[0]]`` when
            nothing else was kept).
        steps: one entry per visited member after the first: ``{"member", "score", "kept"}``, where
            ``score`` is that of the candidate soup with the member added.
        state_dict: the soup's tensors (the uniform average of the selected members).
    """

    selected: list[int]
    order: list[int]
    member_scores: list[float]
    score: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    state_dict: dict[str, Tensor] | None = field(default=None, repr=False)

    def record(self, names: Sequence[str] | None = None, *, metric: str = "score") -> dict[str, Any]:
        """A JSON-serialisable summary for a soup's recorded recipe.

        Args:
            names: a display name per member (paths); default the indices.
            metric: what the score is (e.g. ``"val acc"``).
        """
        name = (lambda i: str(names[i])) if names is not None else (lambda i: i)
        return {
            "rule": "greedy soup: sort by held-out score, start from the best, keep a member only if the "
                    "uniform average with it scores strictly better",
            "citation": GREEDY_CITATION,
            "metric": metric,
            "ingredients": [name(i) for i in self.selected],
            "order": [name(i) for i in self.order],
            "member_scores": {str(name(i)): self.member_scores[i] for i in range(len(self.member_scores))},
            "steps": [{"member": name(s["member"]), "score": s["score"], "kept": s["kept"]} for s in self.steps],
            "soup_score": self.score,
        }


def _load(member: Member) -> dict[str, Tensor]:
    if isinstance(member, Mapping):
        return dict(member)
    from merge.io.sources import open_checkpoint

    with open_checkpoint(member) as src:
        return src.state_dict()


def greedy_soup(members: Sequence[Member], *, score: StateDictScore,
                member_scores: Sequence[float] | None = None, accumulate: str | torch.dtype = "float32",
                on_score: Callable[[int, float, bool], None] | None = None) -> GreedyResult:
    """Greedy soup of ``members``, exactly by the model-soups rule.

    Candidate soups are computed with :func:`merge.average` over the kept members plus the candidate
    (float32 accumulation, integer buffers copied from the first), so the soup scored here is, tensor
    for tensor, the one :func:`merge.soup` writes from the same members in the same order.

    Args:
        members: checkpoint paths or in-memory state dicts; an entry listed twice is two members.
        score: ``score(state_dict) -> float``, higher is better (validation accuracy in the paper). It
            must not modify the state dict. :func:`merge.evaluate.state_dict_scorer` turns a model and
            an ``evaluate(model)`` callback into one.
        member_scores: each member's score if already known (e.g. recorded at training time with the
            same ``score``); None scores every member with ``score``.
        accumulate: accumulator dtype of the averages (``float32`` or ``float64``).
        on_score: called as ``on_score(member_index, candidate_score, kept)`` after each visit (progress).

    Returns:
        A :class:`GreedyResult` with the selection, the per-step scores and the soup's state dict.

    Raises:
        InvalidArgumentError: no members, or ``member_scores`` of the wrong length or not finite.
        MismatchError: members disagree on tensor names or shapes.

    Example:
        >>> members = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([9.0])}]
        >>> r = greedy_soup(members, score=lambda sd: -abs(float(sd["w"]) - 2.0))  # best: w == 2
        >>> r.selected, float(r.state_dict["w"])
        ([0, 1], 2.0)
    """
    if not members:
        raise InvalidArgumentError("greedy_soup: no members given; pass at least one checkpoint or state dict")
    if member_scores is None:
        member_scores = [float(score(_load(m))) for m in members]
    else:
        member_scores = [float(s) for s in member_scores]
        if len(member_scores) != len(members):
            raise InvalidArgumentError(f"greedy_soup: {len(member_scores)} member_scores for {len(members)} members; "
                                       "give one score per member (or None to compute them)")
    bad = [i for i, s in enumerate(member_scores) if s != s or s in (float("inf"), float("-inf"))]
    if bad:
        raise InvalidArgumentError(f"greedy_soup: member scores must be finite numbers; members {bad} scored "
                                   f"{[member_scores[i] for i in bad]}")

    # Step 1: best first. Python's sort is stable, so ties keep the order the members were given.
    order = sorted(range(len(members)), key=lambda i: -member_scores[i])
    # Step 2: the soup starts as the best member alone, at that member's score.
    selected = [order[0]]
    best = member_scores[order[0]]
    soup_sd = average([members[order[0]]], accumulate=accumulate)
    steps: list[dict[str, Any]] = []
    # Step 3: each other member once; kept only on a strict improvement of the held-out score.
    for i in order[1:]:
        candidate = average([members[j] for j in selected + [i]], accumulate=accumulate)
        s = float(score(candidate))
        kept = s > best
        steps.append({"member": i, "score": s, "kept": kept})
        if kept:
            selected.append(i)
            best, soup_sd = s, candidate
        if on_score is not None:
            on_score(i, s, kept)
    return GreedyResult(selected=selected, order=order, member_scores=member_scores, score=best, steps=steps,
                        state_dict=soup_sd)


def greedy_ensemble_selection(member_probs: Sequence[Tensor], labels: Tensor, *, size: int,
                              replacement: bool = True) -> list[int]:
    """Caruana-style greedy ensemble selection by validation NLL, as in hyperparameter ensembles.

    Starting from the empty ensemble, each step adds the member that gives the lowest NLL of the
    averaged probabilities of the ensemble with it (ties: the lowest index). Selection stops when the
    ensemble holds ``size`` entries or when no member lowers the NLL strictly. With replacement a
    member may be picked again, which raises its weight in the average.

    Args:
        member_probs: one ``(N, C)`` probability tensor per member, on the validation set.
        labels: ``(N,)`` validation labels.
        size: the largest number of entries (picks) in the ensemble.
        replacement: allow a member to be picked more than once.

    Returns:
        Member indices in the order picked (repeats allowed with replacement); the ensemble's
        prediction is the mean of ``member_probs[i]`` over this list.

    Raises:
        InvalidArgumentError: no members, ``size`` < 1, or shapes that disagree.

    Example:
        >>> y = torch.tensor([0, 1])
        >>> p = [torch.tensor([[0.95, 0.05], [0.7, 0.3]]), torch.tensor([[0.3, 0.7], [0.1, 0.9]])]
        >>> greedy_ensemble_selection(p, y, size=4)
        [0, 1]
    """
    if not member_probs:
        raise InvalidArgumentError("greedy_ensemble_selection: no members given")
    if size < 1:
        raise InvalidArgumentError(f"greedy_ensemble_selection: size must be at least 1, got {size}")
    shape = tuple(member_probs[0].shape)
    for i, p in enumerate(member_probs):
        if tuple(p.shape) != shape or p.ndim != 2:
            raise InvalidArgumentError(f"greedy_ensemble_selection: member {i} has probabilities of shape "
                                       f"{tuple(p.shape)}, expected {shape} (N examples x C classes) like member 0")
    labels = labels.long().to(member_probs[0].device)
    if labels.shape != (shape[0],):
        raise InvalidArgumentError(f"greedy_ensemble_selection: expected {shape[0]} labels, got shape "
                                   f"{tuple(labels.shape)}")
    # Only the probability of the true class enters the NLL, so select on those columns alone.
    true_p = torch.stack([p.double().gather(1, labels[:, None]).squeeze(1) for p in member_probs])  # (M, N)
    tiny = torch.finfo(torch.float64).tiny
    total = torch.zeros(shape[0], dtype=torch.float64, device=true_p.device)
    picks: list[int] = []
    best = float("inf")
    while len(picks) < size:
        allowed = [i for i in range(len(member_probs)) if replacement or i not in picks]
        if not allowed:
            break
        cand = (total[None, :] + true_p[allowed]) / (len(picks) + 1)
        nll = -torch.log(cand.clamp_min(tiny)).mean(dim=1)
        k = int(torch.argmin(nll))  # argmin returns the first minimum: ties go to the lowest index
        if float(nll[k]) >= best:
            break
        best = float(nll[k])
        picks.append(allowed[k])
        total += true_p[allowed[k]]
    return picks


def greedy_soup_checkpoints(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, data: Any = None,
                            recompute_bn: int = 0, batch_size: int = 256, device: str = "cpu",
                            metric: str = "acc", force: bool = False,
                            on_score: Callable[[int, float, bool], None] | None = None) -> tuple[GreedyResult, Path]:
    """Greedy soup of member checkpoints, rebuilding the model and the data from their metadata.

    Every member and every candidate soup is scored the same way: load the state dict into the
    model rebuilt from ``papa_merge.model``, recompute BatchNorm statistics on ``recompute_bn``
    training batches if asked, and measure ``metric`` on the validation split. The soup is written
    with :func:`merge.soup` over the selected paths, so its recorded recipe lists exactly the kept
    members, plus a ``greedy`` entry with the visiting order and every score; with ``recompute_bn``
    the written soup carries the recalibrated statistics it was scored with.

    Args:
        paths: member checkpoints written by :mod:`merge.train` (or any safetensors file carrying
            ``papa_merge.model`` and, without ``data``, ``papa_merge.data`` metadata).
        out: the soup's ``.safetensors`` path.
        data: a dataset name (``"mnist"``), a ``Splits`` object, or None to rebuild the data from
            the first member's ``papa_merge.data``.
        recompute_bn: number of training batches for BatchNorm recalibration (0: none).
        batch_size: evaluation (and recalibration) batch size.
        device: where models run (``cpu``, ``cuda[:N]``).
        metric: ``acc`` (the paper's choice) or ``nll`` (scored as -NLL so higher is better).
        force: replace an existing ``out``.
        on_score: progress callback, as in :func:`greedy_soup`.

    Returns:
        ``(result, written_path)``.

    Raises:
        MissingMetadataError: a member lacks ``papa_merge.model`` (or ``papa_merge.data`` without ``data``).
        OutputExistsError: ``out`` exists and ``force`` is False.

    Example:
        >>> result, path = greedy_soup_checkpoints(sorted(Path("ckpts").glob("*.safetensors")),
        ...                                        out="greedy.safetensors", recompute_bn=20)  # doctest: +SKIP
    """
    from merge.evaluate import CheckpointEvaluator, recompute_bn_checkpoint
    from merge.io.writer import check_output_free
    from merge.soups import soup

    if not paths:
        raise InvalidArgumentError("greedy soup: no members given; pass at least one checkpoint")
    if metric not in ("acc", "nll"):
        raise InvalidArgumentError(f"greedy soup: metric must be 'acc' or 'nll', got {metric!r}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InvalidArgumentError(f"greedy soup: the output must be a .safetensors file, got {out}")
    check_output_free(out, force=force)  # before the (long) scoring, not after it
    ev = CheckpointEvaluator.from_checkpoints(paths, data=data, batch_size=batch_size, device=device)
    score = ev.scorer(split="val", metric=metric, recompute_bn=recompute_bn)
    result = greedy_soup(list(paths), score=score, on_score=on_score)
    record = result.record([str(p) for p in paths], metric="val acc" if metric == "acc" else "val -nll")
    record["recompute_bn_batches"] = recompute_bn
    # The recorded recipe's members are exactly the kept ones: merge.soup over the selected paths.
    written = soup([paths[i] for i in result.selected], out=out, force=force, recipe_extra={"greedy": record}).path
    if recompute_bn:
        # The soup on disk must be the model that was scored: same weights, same recalibrated statistics.
        recompute_bn_checkpoint(written, num_batches=recompute_bn, state_dict=result.state_dict, evaluator=ev)
    return result, Path(written)
