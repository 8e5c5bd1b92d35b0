"""Greedy selection: greedy soup (weight space) and greedy ensemble selection (prediction space).

Greedy soup, exactly as model soups defines it (Wortsman et al., 2022, "Model soups: averaging
weights of multiple fine-tuned models improves accuracy without increasing inference time",
Recipe 1 and the public ``greedy_soup`` code):

1. sort the members by their held-out (validation) score, best first;
2. start the soup from the best member alone;
3. visit every other member once, in that order; add it to the soup only if the equal-weight
   average of the soup's members plus it scores *strictly* better on the held-out set than the soup.

Each score is that of the model the soup would be: a kept set of one member *is* that member (scored
as stored, exactly as ``papa-merge eval`` scores it); an average of two or more is scored after its
BatchNorm statistics are recomputed when recalibration is asked for, as it will be written.

Greedy ensemble selection (Caruana et al., 2004, "Ensemble selection from libraries of models"), as
hyperparameter ensembles use it (Wenzel et al., 2020; ``greedy_selection`` in google/uncertainty-baselines,
``baselines/cifar/hyperdeepensemble.py``): starting from the empty ensemble, repeatedly add (with
replacement) the member whose addition gives the lowest validation NLL of the averaged predicted
probabilities; stop when the ensemble holds ``size`` *distinct* members, or when no addition improves
the NLL of the ensemble so far.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from merge.errors import InvalidArgumentError
from merge.io.formats import SAFETENSORS_SUFFIX
from merge.soups import average

if TYPE_CHECKING:
    from merge.manifest import Selection

__all__ = ["GreedyResult", "greedy_soup", "greedy_soup_checkpoints", "greedy_ensemble_selection",
           "ensemble_selection", "EnsembleSelection", "select_checkpoints", "greedy_soup_lm", "select_lm_checkpoints",
           "GREEDY_CITATION",
           "ENSEMBLE_SELECTION_CITATION"]

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
            nothing else was kept: a soup of one member is that member).
        steps: one entry per visited member after the first: ``{"member", "score", "kept"}``, where
            ``score`` is that of the candidate soup with the member added.
        state_dict: the soup's tensors (the uniform average of the selected members).
        member_label: how each member's score was obtained (``"val acc, as stored"``).
        soup_label: how each candidate soup's score was obtained (``"val acc, after BatchNorm
            recomputation on 20 training batches of 256"``).
    """

    selected: list[int]
    order: list[int]
    member_scores: list[float]
    score: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    state_dict: dict[str, Tensor] | None = field(default=None, repr=False)
    member_label: str = "score"
    soup_label: str = "score"

    @property
    def score_label(self) -> str:
        """How :attr:`score` was obtained: a member's way for a soup of one, a soup's way otherwise."""
        return self.member_label if len(self.selected) == 1 else self.soup_label

    def record(self, names: Sequence[str] | None = None, *, metric: str | None = None) -> dict[str, Any]:
        """A JSON-serialisable summary for a soup's recorded recipe.

        Args:
            names: a display name per member (paths); default the indices.
            metric: what the score is (e.g. ``"val acc"``); default the result's own labels.
        """
        name = (lambda i: str(names[i])) if names is not None else (lambda i: i)
        return {
            "rule": "greedy soup: sort by held-out score, start from the best, keep a member only if the "
                    "uniform average with it scores strictly better",
            "citation": GREEDY_CITATION,
            "metric": metric or self.soup_label,
            "member_scores_are": self.member_label,
            "candidate_scores_are": self.soup_label,
            "ingredients": [name(i) for i in self.selected],
            "order": [name(i) for i in self.order],
            "member_scores": {str(name(i)): self.member_scores[i] for i in range(len(self.member_scores))},
            "steps": [{"member": name(s["member"]), "score": s["score"], "kept": s["kept"]} for s in self.steps],
            "soup_score": self.score,
            "soup_score_is": self.score_label,
        }


def _load(member: Member) -> dict[str, Tensor]:
    if isinstance(member, Mapping):
        return dict(member)
    from merge.io.sources import open_checkpoint

    with open_checkpoint(member) as src:
        return src.state_dict()


def greedy_soup(members: Sequence[Member], *, score: StateDictScore,
                member_scores: Sequence[float] | None = None, accumulate: str | torch.dtype = "float32",
                on_score: Callable[[int, float, bool], None] | None = None,
                on_member: Callable[[int, float], None] | None = None,
                member_label: str = "score", soup_label: str = "score") -> GreedyResult:
    """Greedy soup of ``members``, exactly by the model-soups rule.

    Candidate soups are computed with :func:`merge.average` over the kept members plus the candidate
    (float32 accumulation, integer buffers copied from the first), so the soup scored here is, tensor
    for tensor, the one :func:`merge.soup` writes from the same members in the same order.

    Args:
        members: checkpoint paths or in-memory state dicts; an entry listed twice is two members.
        score: ``score(state_dict) -> float`` of a candidate soup (two or more members), higher is
            better (validation accuracy in the paper). It must not modify the state dict.
            :func:`merge.evaluate.state_dict_scorer` turns a model and an ``evaluate(model)`` callback
            into one.
        member_scores: each member's score if already known (e.g. recorded at training time); None
            scores every member with ``score``.
        accumulate: accumulator dtype of the averages (``float32`` or ``float64``).
        on_score: called as ``on_score(member_index, candidate_score, kept)`` after each visit (progress).
        on_member: called as ``on_member(member_index, score)`` as each member is scored.
        member_label, soup_label: how member scores and candidate scores are obtained (recorded in the result).

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
        scores = []
        for i, m in enumerate(members):
            scores.append(float(score(_load(m))))
            if on_member is not None:
                on_member(i, scores[-1])
        member_scores = scores
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
                        state_dict=soup_sd, member_label=member_label, soup_label=soup_label)


# --------------------------------------------------------------------------------------------------
# Greedy ensemble selection (prediction space)

SELECTION_OBJECTIVES = ("nll", "acc")


@dataclass
class EnsembleSelection:
    """What greedy ensemble selection picked.

    Attributes:
        picks: member indices in the order picked; a member picked twice counts twice in the average.
        members: the distinct members, in the order first picked.
        counts: each distinct member's pick count (its weight), aligned with ``members``.
        by: the objective (``nll``, or ``acc`` maximised).
        acc, nll: the final ensemble's accuracy and NLL on the selection data.
        steps: per pick, ``{"member", "acc", "nll"}`` of the ensemble after it.
        stopped: ``size`` (``size`` distinct members reached), ``no improvement`` or ``max picks``.
    """

    picks: list[int]
    members: list[int]
    counts: list[int]
    by: str
    acc: float
    nll: float
    steps: list[dict[str, Any]]
    stopped: str


def _check_probs(member_probs: Sequence[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    if not member_probs:
        raise InvalidArgumentError("greedy_ensemble_selection: no members given")
    shape = tuple(member_probs[0].shape)
    for i, p in enumerate(member_probs):
        if tuple(p.shape) != shape or p.ndim != 2:
            raise InvalidArgumentError(f"greedy_ensemble_selection: member {i} has probabilities of shape "
                                       f"{tuple(p.shape)}, expected {shape} (N examples x C classes) like member 0")
    labels = labels.long().to(member_probs[0].device)
    if labels.shape != (shape[0],):
        raise InvalidArgumentError(f"greedy_ensemble_selection: expected {shape[0]} labels, got shape "
                                   f"{tuple(labels.shape)}")
    return torch.stack([p.detach().double() for p in member_probs]), labels  # (M, N, C)


def ensemble_selection(member_probs: Sequence[Tensor], labels: Tensor, *, size: int, by: str = "nll",
                       replacement: bool = True, max_picks: int = 1000) -> EnsembleSelection:
    """Caruana-style greedy ensemble selection, as the hyperparameter-ensembles reference code does it.

    A port of ``greedy_selection`` in google/uncertainty-baselines (``baselines/cifar/hyperdeepensemble.py``):
    while the ensemble holds fewer than ``size`` distinct members, try adding each member (with
    replacement: one already in counts again, raising its weight); keep the candidate with the best
    objective of the averaged probabilities if it beats the best objective so far, strictly (ties: the
    lowest index); otherwise stop.

    Deliberate differences from the reference: ``by="acc"`` *maximises* accuracy (the reference
    minimises its ``acc`` objective, which picks the worst members); probabilities are averaged in
    float64; and ``max_picks`` bounds the number of picks (the reference has no bound; with one
    that large it is never reached in practice).

    Args:
        member_probs: one ``(N, C)`` probability tensor per member, on the validation set.
        labels: ``(N,)`` validation labels.
        size: the number of distinct members to reach (the ensemble size the paper compares at).
        by: ``nll`` (the paper's objective) or ``acc``.
        replacement: allow a member to be picked more than once (the paper's choice).
        max_picks: stop after this many picks.

    Returns:
        An :class:`EnsembleSelection`.

    Raises:
        InvalidArgumentError: no members, ``size`` < 1, an unknown ``by``, or shapes that disagree.

    Example:
        >>> y = torch.tensor([0, 1])
        >>> p = [torch.tensor([[0.95, 0.05], [0.7, 0.3]]), torch.tensor([[0.3, 0.7], [0.1, 0.9]])]
        >>> ensemble_selection(p, y, size=2).counts
        [1, 1]
    """
    if size < 1:
        raise InvalidArgumentError(f"greedy_ensemble_selection: size must be at least 1, got {size}")
    if by not in SELECTION_OBJECTIVES:
        raise InvalidArgumentError(f"greedy_ensemble_selection: by must be one of {', '.join(SELECTION_OBJECTIVES)}; "
                                   f"got {by!r}", option="by", choices=SELECTION_OBJECTIVES)
    if max_picks < 1:
        raise InvalidArgumentError(f"greedy_ensemble_selection: max_picks must be at least 1, got {max_picks}")
    probs, labels = _check_probs(member_probs, labels)
    m, n, _c = probs.shape
    true_p = probs.gather(2, labels[None, :, None].expand(m, n, 1)).squeeze(2)  # (M, N)
    tiny = torch.finfo(torch.float64).tiny
    total = torch.zeros_like(probs[0])  # sum of the picked members' probabilities, (N, C)
    total_true = torch.zeros(n, dtype=torch.float64, device=probs.device)
    picks: list[int] = []
    steps: list[dict[str, Any]] = []
    best = float("inf")
    stopped = "size"
    while len(set(picks)) < size:
        if len(picks) >= max_picks:
            stopped = "max picks"
            break
        allowed = [i for i in range(m) if replacement or i not in picks]
        if not allowed:
            stopped = "no improvement"
            break
        k = len(picks) + 1
        nll = -torch.log(((total_true[None, :] + true_p[allowed]) / k).clamp_min(tiny)).mean(dim=1)
        # The ensemble's prediction is the argmax of its averaged probabilities (the first class on ties).
        acc = (((total[None] + probs[allowed]) / k).argmax(dim=2) == labels[None, :]).double().mean(dim=1)
        objective = nll if by == "nll" else -acc
        j = int(torch.argmin(objective))  # the first minimum: ties go to the lowest index, as the reference
        if not float(objective[j]) < best:
            stopped = "no improvement"
            break
        best = float(objective[j])
        picks.append(allowed[j])
        total += probs[allowed[j]]
        total_true += true_p[allowed[j]]
        steps.append({"member": allowed[j], "acc": float(acc[j]), "nll": float(nll[j])})
    members: list[int] = []
    for i in picks:
        if i not in members:
            members.append(i)
    last = steps[-1] if steps else {"acc": float("nan"), "nll": float("nan")}
    return EnsembleSelection(picks=picks, members=members, counts=[picks.count(i) for i in members], by=by,
                             acc=last["acc"], nll=last["nll"], steps=steps, stopped=stopped)


def greedy_ensemble_selection(member_probs: Sequence[Tensor], labels: Tensor, *, size: int, by: str = "nll",
                              replacement: bool = True) -> list[int]:
    """Greedy ensemble selection by validation NLL; the picks of :func:`ensemble_selection`.

    Selection stops when the ensemble holds ``size`` distinct members or when no pick improves it;
    with replacement a member may be picked again, which raises its weight in the average.

    Args:
        member_probs: one ``(N, C)`` probability tensor per member, on the validation set.
        labels: ``(N,)`` validation labels.
        size: the number of distinct members to reach.
        by: ``nll`` (the paper's objective) or ``acc``.
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
    return ensemble_selection(member_probs, labels, size=size, by=by, replacement=replacement).picks


# --------------------------------------------------------------------------------------------------
# On checkpoints: the model and data rebuilt from metadata (or named), scores labelled

def greedy_soup_checkpoints(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, data: Any = None,
                            model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                            in_chans: int | None = None, image_size: int | None = None,
                            recompute_bn: int = 0, batch_size: int = 256, device: str = "cpu",
                            metric: str = "acc", force: bool = False, progress: bool = False,
                            on_score: Callable[[int, float, bool], None] | None = None,
                            on_member: Callable[[int, float], None] | None = None,
                            on_labels: Callable[[str, str], None] | None = None,
                            eval_text: str | os.PathLike | None = None,
                            block_size: int | None = None) -> tuple[GreedyResult, Path]:
    """Greedy soup of member checkpoints, rebuilding the model and the data from their metadata.

    Each candidate is scored as the model it would be written as. A member alone is scored as stored
    (its own BatchNorm statistics, as ``papa-merge eval`` scores it), so a soup that keeps one member
    *is* that member, written unchanged with that member's metrics. An average of two or more members
    is scored after recomputing its BatchNorm statistics on ``recompute_bn`` training batches (when
    asked), and written with those statistics. The labels of both ways are in the result and the
    written recipe. The soup is written with :func:`merge.soup` over the selected paths, so its
    recorded recipe lists exactly the kept members, plus a ``greedy`` entry with the visiting order
    and every score.

    Args:
        paths: member checkpoints written by :mod:`merge.train`, or any checkpoints (``.pth`` state
            dicts, safetensors) when ``model`` and ``data`` name what they are.
        out: the soup's ``.safetensors`` path.
        data: a dataset name or a ``Splits`` object; None: from the members' ``papa_merge.data``. The
            split is always the members' own when they record one.
        model, num_classes, in_chans, image_size: the architecture of checkpoints that record none
            (:func:`merge.evaluate.eval_model_spec`); recorded in the soup so it evaluates like a member.
        recompute_bn: number of training batches for BatchNorm recalibration of soups of two or more (0: none).
        batch_size: evaluation (and recalibration) batch size.
        device: where models run (``cpu``, ``cuda[:N]``).
        metric: ``acc`` (the paper's choice) or ``nll`` (scored as -NLL so higher is better).
        force: replace an existing ``out``.
        progress: progress bars on stderr (members, candidates, and each pass over data).
        on_score: called as each candidate is scored, as in :func:`greedy_soup`.
        on_member: called as ``on_member(index, score)`` as each member is scored.
        on_labels: called once as ``on_labels(member_label, soup_label)`` when the model and data are
            ready, before any scoring: how members and candidate soups are scored (batches actually used).
        eval_text, block_size: members that are causal language models (Hugging Face folders) are scored by
            perplexity on this held-out text instead (:func:`greedy_soup_lm`); ``data``, ``model``, ``metric``
            and ``recompute_bn`` do not apply to them.

    Returns:
        ``(result, written_path)``.

    Raises:
        MissingMetadataError: a member lacks ``papa_merge.model`` (without ``model``) or no member
            records its data (without ``data``).
        InvalidArgumentError: ``data`` names another dataset than the members', a bad metric or output.
        OutputExistsError: ``out`` exists and ``force`` is False.

    Example:
        >>> result, path = greedy_soup_checkpoints(sorted(Path("ckpts").glob("*.safetensors")),
        ...                                        out="greedy.safetensors", recompute_bn=20)  # doctest: +SKIP
        >>> result.score, result.score_label  # doctest: +SKIP
        (0.981, 'val acc, after BatchNorm recomputation on 20 training batches of 256')
    """
    import json

    from merge.evaluate import CheckpointEvaluator, scoring_label
    from merge.evaluate.checkpoints import soup_recompute_bn
    from merge.io.sources import open_checkpoint
    from merge.io.writer import check_output_free
    from merge.keys import DATA_KEY, MODEL_KEY

    if eval_text is not None:
        return greedy_soup_lm(paths, out=out, eval_text=eval_text, block_size=block_size, batch_size=batch_size,
                              device=device, force=force, progress=progress, on_score=on_score, on_member=on_member,
                              on_labels=on_labels)
    if not paths:
        raise InvalidArgumentError("greedy soup: no members given; pass at least one checkpoint")
    if metric not in ("acc", "nll"):
        raise InvalidArgumentError(f"greedy soup: metric must be 'acc' or 'nll', got {metric!r}")
    out = Path(out)
    if out.suffix != SAFETENSORS_SUFFIX:
        raise InvalidArgumentError(f"greedy soup: the output must be a .safetensors file, got {out}")
    check_output_free(out, force=force)  # before the (long) scoring, not after it
    ev = CheckpointEvaluator.from_checkpoints(paths, data=data, model=model, num_classes=num_classes,
                                              in_chans=in_chans, image_size=image_size, batch_size=batch_size,
                                              device=device, progress=progress)
    what = "val acc" if metric == "acc" else "val -nll"
    member_label = f"{what}, {scoring_label(0, batch_size)}"
    # Labelled with the batches actually used: fewer than asked when the training split holds fewer.
    soup_label = f"{what}, {scoring_label(ev.bn_batches(recompute_bn), batch_size)}"
    if on_labels is not None:
        on_labels(member_label, soup_label)
    score_member = ev.scorer(split="val", metric=metric, recompute_bn=0)
    score_soup = ev.scorer(split="val", metric=metric, recompute_bn=recompute_bn)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * len(paths) - 1, desc="greedy soup", unit="model", dynamic_ncols=True)

    def member_done(i: int, s: float) -> None:
        if bar is not None:
            bar.update(1)
        if on_member is not None:
            on_member(i, s)

    def candidate_done(i: int, s: float, kept: bool) -> None:
        if bar is not None:
            bar.update(1)
        if on_score is not None:
            on_score(i, s, kept)

    member_scores = []
    try:
        for i, p in enumerate(paths):
            with open_checkpoint(p) as src:
                member_scores.append(float(score_member(src.state_dict())))
            member_done(i, member_scores[-1])
        result = greedy_soup(list(paths), score=score_soup, member_scores=member_scores, on_score=candidate_done,
                             member_label=member_label, soup_label=soup_label)
    finally:
        if bar is not None:
            bar.close()
    record = result.record([str(p) for p in paths])
    record["recompute_bn_batches"] = ev.bn_batches(recompute_bn) if len(result.selected) > 1 else 0
    # The soup evaluates like its members: it records the architecture and split it was scored with.
    meta = {MODEL_KEY: json.dumps(ev.model_meta, sort_keys=True)}
    if getattr(ev.splits, "spec", None):
        meta[DATA_KEY] = json.dumps(ev.splits.spec, sort_keys=True)
    # The recorded recipe's members are exactly the kept ones: merge.soup over the selected paths. The soup on
    # disk is the model that was scored (same weights, same recalibrated statistics), recalibrated before it
    # appears under its name.
    many = len(result.selected) > 1
    written = soup_recompute_bn([paths[i] for i in result.selected], out=out, recompute_bn=recompute_bn if many else 0,
                                evaluator=ev, state_dict=result.state_dict, force=force, metadata=meta,
                                recipe_extra={"greedy": record}).path
    return result, Path(written)


def select_checkpoints(paths: Sequence[str | os.PathLike], *, size: int, by: str = "nll", data: Any = None,
                       model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                       in_chans: int | None = None, image_size: int | None = None, batch_size: int = 256,
                       device: str = "cpu", out: str | os.PathLike | None = None, force: bool = False,
                       progress: bool = False, on_member: Callable[[int, dict[str, float]], None] | None = None,
                       logits: Sequence[Tensor] | None = None, eval_text: str | os.PathLike | None = None,
                       block_size: int | None = None) -> Selection:
    """Greedy ensemble selection of checkpoints on their validation split, written as a manifest.

    Every checkpoint is evaluated once on the members' own val split; :func:`ensemble_selection`
    then picks, with replacement, until the ensemble holds ``size`` distinct members (or no pick
    improves it). The :class:`merge.manifest.Selection` lists the members with their pick counts as
    weights, the ensemble's val metrics and each member's.

    Args:
        paths: the pool (checkpoints; one architecture and split).
        size: distinct members to select (the ensemble size k).
        by: ``nll`` (hyperparameter ensembles' objective) or ``acc``.
        data, model, num_classes, in_chans, image_size: as in :func:`greedy_soup_checkpoints`.
        batch_size, device: evaluation batch size and device.
        out: write the manifest here (a ``.json`` path); None: do not write.
        force: replace an existing ``out``.
        progress: progress bars on stderr.
        on_member: called as ``on_member(index, val_metrics)`` as each checkpoint is evaluated.
        logits: the pool's val logits if already computed (one ``(N, C)`` tensor per path, in the
            order of the val split); skips the evaluation.
        eval_text, block_size: the pool is causal language models scored on this held-out text
            (:func:`select_lm_checkpoints`).

    Returns:
        The :class:`merge.manifest.Selection` (``.paths``, ``.weights``, ``.scores``).

    Raises:
        MissingMetadataError, MismatchError, InvalidArgumentError: as in :func:`greedy_soup_checkpoints`.
        OutputExistsError: ``out`` exists and ``force`` is False (checked before any evaluation).

    Example:
        >>> sel = select_checkpoints(sorted(Path("pool").glob("*.safetensors")), size=3,
        ...                          out="selection.json")  # doctest: +SKIP
        >>> sel.paths, sel.weights  # doctest: +SKIP
    """
    from merge.evaluate import CheckpointEvaluator, ensemble_probs, metrics, metrics_from_probs
    from merge.io.sources import open_checkpoint
    from merge.manifest import check_manifest_output, selection_from_picks, write_manifest

    if eval_text is not None:
        return select_lm_checkpoints(paths, size=size, by=by, eval_text=eval_text, block_size=block_size,
                                     batch_size=batch_size, device=device, out=out, force=force, progress=progress,
                                     on_member=on_member)
    if not paths:
        raise InvalidArgumentError("select: no checkpoints given; pass the pool to select from")
    if size < 1:
        raise InvalidArgumentError(f"select: size must be at least 1, got {size}", option="size")
    if by not in SELECTION_OBJECTIVES:
        raise InvalidArgumentError(f"select: by must be one of {', '.join(SELECTION_OBJECTIVES)}; got {by!r}",
                                   option="by", choices=SELECTION_OBJECTIVES)
    if out is not None:
        check_manifest_output(out, force=force)  # before the (long) evaluation, not after it
    ev = CheckpointEvaluator.from_checkpoints(paths, data=data, model=model, num_classes=num_classes,
                                              in_chans=in_chans, image_size=image_size, batch_size=batch_size,
                                              device=device, progress=progress)
    labels = torch.as_tensor(ev.splits.val.labels).long()
    if logits is None:
        logits = []
        for i, p in enumerate(paths):
            with open_checkpoint(p) as src:
                lg, labels = ev.logits(src.state_dict(), "val")
            logits.append(lg)
            if on_member is not None:
                on_member(i, metrics(lg, labels, n_bins=ev.n_bins))
    elif len(logits) != len(paths):
        raise InvalidArgumentError(f"select: {len(logits)} logits for {len(paths)} checkpoints")
    pool_scores = [{"val": metrics(lg, labels, n_bins=ev.n_bins)} for lg in logits]
    probs = [torch.softmax(lg.double(), dim=1) for lg in logits]
    chosen = ensemble_selection(probs, labels, size=size, by=by)
    weights = [chosen.counts[chosen.members.index(i)] for i in chosen.members]
    ens = metrics_from_probs(ensemble_probs([logits[i] for i in chosen.members], weights=weights), labels,
                             n_bins=ev.n_bins)
    sel = selection_from_picks([str(p) for p in paths], chosen.picks, by=by, size=size, split="val",
                               scores={"val": ens}, member_scores=[pool_scores[i] for i in chosen.members],
                               pool_scores=pool_scores,
                               steps=[{**s, "member": str(paths[s["member"]])} for s in chosen.steps],
                               stopped=chosen.stopped, data=getattr(ev.splits, "spec", None) or None)
    if out is not None:
        write_manifest(sel, out, force=force)
    return sel


# --------------------------------------------------------------------------------------------------
# Causal language models: scored by perplexity on a held-out text (merge.evaluate.lm)

def greedy_soup_lm(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, eval_text: str | os.PathLike,
                   block_size: int | None = None, batch_size: int = 8, device: str = "cpu", force: bool = False,
                   progress: bool = False, on_score: Callable[[int, float, bool], None] | None = None,
                   on_member: Callable[[int, float], None] | None = None,
                   on_labels: Callable[[str, str], None] | None = None) -> tuple[GreedyResult, Path]:
    """Greedy soup of causal language models by held-out perplexity: model soups' rule with perplexity for accuracy.

    The score of each member and candidate soup is ``-NLL`` per token on ``eval_text``
    (:meth:`merge.evaluate.lm.LanguageModelEvaluator.scorer`), so :func:`greedy_soup` keeps a member only if
    the soup with it has a strictly lower perplexity. The soup is written with :func:`merge.soup` over the
    kept folders: a model folder (config and tokenizer copied) that loads with ``from_pretrained``.

    Args:
        paths: causal-LM folders (or ``hf://`` references) fine-tuned from one start, one tokenizer.
        out: the soup's folder.
        eval_text: the held-out text (plain text, or JSONL with a ``text`` field).
        block_size, batch_size, device: of the perplexity passes (:func:`merge.evaluate.evaluate_lm_checkpoints`).
        force, progress, on_score, on_member, on_labels: as :func:`greedy_soup_checkpoints`; the scores
            passed are ``-NLL`` per token (perplexity ``exp(-score)``).

    Returns:
        ``(result, written_path)``.

    Raises:
        InvalidArgumentError: ``out`` is a single ``.safetensors`` file, a member is not a causal LM, the text
            is empty.
        CheckpointNotFoundError: a member has no tokenizer files.
        OutputExistsError: ``out`` exists and ``force`` is False (checked before any scoring).

    Example:
        >>> result, path = greedy_soup_lm(["ft-a/", "ft-b/", "ft-c/"], out="greedy/",
        ...                               eval_text="val.jsonl")  # doctest: +SKIP
        >>> math.exp(-result.score)  # the soup's perplexity  # doctest: +SKIP
    """
    from merge.evaluate.lm import LanguageModelEvaluator
    from merge.io.writer import check_output_free
    from merge.soups import soup

    if not paths:
        raise InvalidArgumentError("greedy soup: no members given; pass at least one language-model folder")
    out = Path(out)
    if out.suffix == SAFETENSORS_SUFFIX:
        raise InvalidArgumentError(f"greedy soup: {out}: a soup of language models is written as a model folder "
                                   "(weights, config and tokenizer, loadable with from_pretrained); name a folder",
                                   path=out, option="out")
    check_output_free(out, force=force)  # before the (long) scoring, not after it
    ev = LanguageModelEvaluator.from_members(paths, eval_text=eval_text, block_size=block_size, batch_size=batch_size,
                                             device=device, progress=progress)
    label = f"-nll per token, {ev.label()}"
    if on_labels is not None:
        on_labels(label, label)
    score = ev.scorer()
    member_scores = []
    for i, p in enumerate(paths):
        member_scores.append(float(score(ev.state_dict_of(p))))
        if on_member is not None:
            on_member(i, member_scores[-1])
    result = greedy_soup(list(paths), score=score, member_scores=member_scores, on_score=on_score,
                         member_label=label, soup_label=label)
    record = result.record([str(p) for p in paths])
    written = soup([paths[i] for i in result.selected], out=out, force=force, progress=progress,
                   recipe_extra={"greedy": record}).path
    return result, Path(written)


def select_lm_checkpoints(paths: Sequence[str | os.PathLike], *, size: int, eval_text: str | os.PathLike,
                          by: str = "nll", block_size: int | None = None, batch_size: int = 8, device: str = "cpu",
                          out: str | os.PathLike | None = None, force: bool = False, progress: bool = False,
                          on_member: Callable[[int, dict[str, float]], None] | None = None) -> Selection:
    """Greedy ensemble selection of causal language models by the held-out NLL of their mixture.

    The ensemble of language models averages their next-token distributions, so its NLL on a token needs only
    each member's probability of that token: :func:`ensemble_selection` runs on those (one two-way
    distribution per token, ``[p, 1 - p]`` with the observed token first), which gives exactly the mixture's
    token-weighted NLL. Only ``by="nll"`` applies (a language model has no accuracy here).

    Args:
        paths: the pool (causal-LM folders, one tokenizer).
        size, out, force, progress: as :func:`select_checkpoints`.
        eval_text, block_size, batch_size, device: as :func:`greedy_soup_lm`.
        by: ``nll``.
        on_member: called as ``on_member(index, {"nll", "ppl", "tokens"})`` as each model is scored.

    Returns:
        The :class:`merge.manifest.Selection`; its scores are ``{"text": {"nll", "ppl", "tokens"}}``.

    Raises:
        InvalidArgumentError: ``by`` is not ``nll``, ``size`` < 1, or as :func:`greedy_soup_lm`.
        OutputExistsError: ``out`` exists and ``force`` is False (checked before any evaluation).
    """
    import math

    from merge.evaluate.lm import TEXT_SPLIT, LanguageModelEvaluator, Perplexity, mixture_logprobs
    from merge.manifest import check_manifest_output, selection_from_picks, write_manifest

    if not paths:
        raise InvalidArgumentError("select: no checkpoints given; pass the pool to select from")
    if size < 1:
        raise InvalidArgumentError(f"select: size must be at least 1, got {size}", option="size")
    if by != "nll":
        raise InvalidArgumentError(f"select: language models are selected by the NLL of their mixture; got by={by!r}",
                                   option="by", choices=("nll",))
    if out is not None:
        check_manifest_output(out, force=force)
    ev = LanguageModelEvaluator.from_members(paths, eval_text=eval_text, block_size=block_size, batch_size=batch_size,
                                             device=device, progress=progress)
    lps = []
    for i, p in enumerate(paths):
        lps.append(ev.logprobs(ev.state_dict_of(p)))
        if on_member is not None:
            on_member(i, Perplexity.from_logprobs(lps[-1]).as_metrics())
    p_true = [lp.exp() for lp in lps]
    chosen = ensemble_selection([torch.stack([p, 1 - p], dim=1) for p in p_true],
                                torch.zeros(len(p_true[0]), dtype=torch.long), size=size, by="nll")
    weights = [chosen.counts[chosen.members.index(i)] for i in chosen.members]
    ens = Perplexity.from_logprobs(mixture_logprobs([lps[i] for i in chosen.members], weights)).as_metrics()
    pool_scores = [{TEXT_SPLIT: Perplexity.from_logprobs(lp).as_metrics()} for lp in lps]
    sel = selection_from_picks([str(p) for p in paths], chosen.picks, by="nll", size=size, split=TEXT_SPLIT,
                               scores={TEXT_SPLIT: ens}, member_scores=[pool_scores[i] for i in chosen.members],
                               pool_scores=pool_scores,
                               steps=[{"member": str(paths[s["member"]]), "nll": s["nll"], "ppl": math.exp(s["nll"])}
                                      for s in chosen.steps],
                               stopped=chosen.stopped, data={"eval_text": str(eval_text), "block_size": ev.block_size})
    if out is not None:
        write_manifest(sel, out, force=force)
    return sel
