"""Evaluation: accuracy, NLL and calibration error of members, prediction ensembles and soups.

The metrics follow the papers' definitions so the numbers are comparable with them:

- accuracy: top-1;
- NLL: mean cross-entropy of the softmax (natural log), as in hyperparameter ensembles (Wenzel et
  al., 2020), which select members by validation NLL;
- ECE: expected calibration error with equal-width bins of top-1 confidence, each bin's
  |accuracy - mean confidence| weighted by its share of the examples (Guo et al., 2017).

A *prediction ensemble* averages the members' softmax probabilities (the usual deep-ensemble
prediction); it costs one forward pass per member, which is what a soup avoids.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge.keys import DATA_KEY, MODEL_KEY, RECIPE_KEY

__all__ = ["metrics", "metrics_from_probs", "ensemble_probs", "predict", "model_evaluator", "state_dict_scorer",
           "load_into", "checkpoint_metadata", "CheckpointEvaluator", "EvalRow", "evaluate_checkpoints",
           "summarize_members", "format_table", "TableFormatter", "recompute_bn_checkpoint", "resolve_eval_data",
           "eval_model_spec", "scoring_label", "Evaluate", "StateDictScore"]


def _check_labels(n: int, labels: Tensor, what: str) -> Tensor:
    from merge.errors import InvalidArgumentError

    if labels.ndim != 1 or labels.shape[0] != n:
        raise InvalidArgumentError(f"{what}: expected {n} labels as a 1-D tensor, got shape {tuple(labels.shape)}")
    if n == 0:
        raise InvalidArgumentError(f"{what}: no examples to evaluate")
    return labels.long()


def metrics_from_probs(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE of class probabilities (e.g. a prediction ensemble's).

    Args:
        probs: ``(N, C)`` probabilities, each row summing to one.
        labels: ``(N,)`` integer class labels.
        n_bins: number of equal-width confidence bins for the ECE.

    Returns:
        ``{"acc": float, "nll": float, "ece": float}``; ``acc`` and ``ece`` in [0, 1].

    Raises:
        InvalidArgumentError: shapes disagree or there are no examples.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> round(metrics_from_probs(p, torch.tensor([0, 0]))["acc"], 2)
        0.5
    """
    from merge.errors import InvalidArgumentError

    if probs.ndim != 2:
        raise InvalidArgumentError(f"probs: expected a (N, C) tensor, got shape {tuple(probs.shape)}")
    labels = _check_labels(probs.shape[0], labels.to(probs.device), "probs")
    p = probs.detach().double()
    # Clamping only guards log(0) for a probability that underflowed; it changes nothing else.
    nll = -torch.log(p.gather(1, labels[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny))
    return _acc_ece(p, labels, nll, n_bins)


def metrics(logits: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL (mean softmax cross-entropy) and ECE of logits.

    Computed in float64 from ``log_softmax`` so NLL stays exact for confident, wrong predictions.

    Args:
        logits: ``(N, C)`` unnormalised scores.
        labels: ``(N,)`` integer class labels.
        n_bins: number of equal-width confidence bins for the ECE.

    Returns:
        ``{"acc": float, "nll": float, "ece": float}``.

    Raises:
        InvalidArgumentError: shapes disagree or there are no examples.

    Example:
        >>> m = metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        >>> m["acc"], round(m["nll"], 4)
        (1.0, 0.2201)
    """
    from merge.errors import InvalidArgumentError

    if logits.ndim != 2:
        raise InvalidArgumentError(f"logits: expected a (N, C) tensor, got shape {tuple(logits.shape)}")
    labels = _check_labels(logits.shape[0], labels.to(logits.device), "logits")
    logp = torch.log_softmax(logits.detach().double(), dim=1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    return _acc_ece(logp.exp(), labels, nll, n_bins)


def _acc_ece(p: Tensor, labels: Tensor, nll: Tensor, n_bins: int) -> dict[str, float]:
    conf, pred = p.max(dim=1)
    correct = (pred == labels).double()
    # Bin i holds confidences in (i/B, (i+1)/B]; a confidence of exactly 0 cannot occur for a top-1.
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    n = p.shape[0]
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, bins, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, bins, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, bins, correct)
    ece = (sum_acc - sum_conf).abs().sum() / n  # sum_b |B|/n * |acc_b - conf_b| = sum_b |sum_acc - sum_conf| / n
    return {"acc": float(correct.mean()), "nll": float(nll.mean()), "ece": float(ece)}


def ensemble_probs(logits: Sequence[Tensor], *, weights: Sequence[float] | None = None) -> Tensor:
    """The prediction ensemble: the (weighted) mean of the members' softmax probabilities.

    Args:
        logits: one ``(N, C)`` logits tensor per member, same examples in the same order.
        weights: one non-negative weight per member (e.g. greedy selection's pick counts); None: equal.

    Returns:
        ``(N, C)`` float64 probabilities.

    Raises:
        InvalidArgumentError: no members, members with different shapes, or bad weights.

    Example:
        >>> ensemble_probs([torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]])])
        tensor([[0.3750, 0.6250]], dtype=torch.float64)
    """
    from merge.errors import InvalidArgumentError

    if not logits:
        raise InvalidArgumentError("ensemble_probs: no members given")
    if weights is None:
        weights = [1.0] * len(logits)
    w = [float(x) for x in weights]
    if len(w) != len(logits) or any(not x >= 0 or x == float("inf") for x in w) or sum(w) <= 0:
        raise InvalidArgumentError(f"ensemble_probs: need one finite weight >= 0 per member ({len(logits)}), "
                                   f"not all zero; got {list(weights)}")
    shape = tuple(logits[0].shape)
    acc = torch.zeros(shape, dtype=torch.float64, device=logits[0].device)
    for i, (lg, wi) in enumerate(zip(logits, w)):
        if tuple(lg.shape) != shape:
            raise InvalidArgumentError(f"ensemble_probs: member {i} has logits of shape {tuple(lg.shape)}, "
                                       f"member 0 has {shape}; members must be evaluated on the same examples")
        acc += wi * torch.softmax(lg.detach().double(), dim=1)
    return acc / sum(w)


# --------------------------------------------------------------------------------------------------
# Models and checkpoints

Evaluate = Callable[[nn.Module], float]
"""``evaluate(model) -> float``: a held-out score of any model, higher is better."""
StateDictScore = Callable[[Mapping[str, Tensor]], float]
"""``score(state_dict) -> float``: what :func:`merge.greedy.greedy_soup` calls on each candidate soup."""

SPLITS = ("val", "test")


def _forward_default(model: nn.Module, inputs: Any) -> Tensor:
    try:
        from merge.models import forward_logits
    except ImportError:  # merge.models needs the [train] extras; plain modules still work
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return forward_logits(model, inputs)


def predict(model: nn.Module, loader: Iterable[Any], *, device: str | torch.device = "cpu",
            forward: Callable[[nn.Module, Any], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader`` in eval mode without gradients; return all logits and labels.

    Args:
        model: any module; its train/eval mode is restored afterwards.
        loader: yields ``(inputs, labels)``; inputs are a tensor or a dict of tensors (tokenised text).
        device: where the forward passes run (the model must already be there).
        forward: ``forward(model, inputs) -> logits``; default :func:`merge.models.forward_logits`
            (which unwraps Hugging Face outputs), else ``model(inputs)``.

    Returns:
        ``(logits, labels)``: float32 ``(N, C)`` and int64 ``(N,)`` CPU tensors, in loader order.

    Raises:
        InvalidArgumentError: the loader yielded nothing.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> logits, labels = predict(net, [(torch.randn(5, 4), torch.arange(5) % 3)])
        >>> tuple(logits.shape), labels.tolist()
        ((5, 3), [0, 1, 2, 0, 1])
    """
    from merge.bn import move_to
    from merge.errors import InvalidArgumentError

    fwd = forward or _forward_default
    was_training = model.training
    outs, labs = [], []
    model.eval()
    try:
        with torch.inference_mode():
            for inputs, labels in loader:
                outs.append(fwd(model, move_to(inputs, device)).float().cpu())
                labs.append(torch.as_tensor(labels).long().cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise InvalidArgumentError("predict: the loader yielded no batch; nothing to evaluate")
    return torch.cat(outs), torch.cat(labs)


def model_evaluator(loader: Iterable[Any], *, metric: str = "acc", device: str | torch.device = "cpu",
                    forward: Callable[[nn.Module, Any], Tensor] | None = None, n_bins: int = 15) -> Evaluate:
    """An ``evaluate(model) -> float`` callback on a held-out loader, higher is better.

    Args:
        loader: held-out ``(inputs, labels)`` batches (the validation set for greedy soup).
        metric: ``acc``, ``nll`` (returned negated) or ``ece`` (returned negated).
        device, forward: as in :func:`predict`.

    Returns:
        The callback.

    Raises:
        InvalidArgumentError: an unknown metric.

    Example:
        >>> ev = model_evaluator([(torch.eye(3), torch.arange(3))])
        >>> ev(nn.Identity())
        1.0
    """
    from merge.errors import InvalidArgumentError

    if metric not in ("acc", "nll", "ece"):
        raise InvalidArgumentError(f"metric must be one of acc, nll, ece; got {metric!r}")
    sign = 1.0 if metric == "acc" else -1.0

    def evaluate(model: nn.Module) -> float:
        logits, labels = predict(model, loader, device=device, forward=forward)
        return sign * metrics(logits, labels, n_bins=n_bins)[metric]

    return evaluate


def state_dict_scorer(model: nn.Module, evaluate: Evaluate, *, bn_loader: Iterable[Any] | None = None,
                      bn_batches: int | None = None, device: str | torch.device = "cpu",
                      forward: Callable[[nn.Module, Any], Any] | None = None) -> StateDictScore:
    """Turn ``evaluate(model)`` into ``score(state_dict)`` for greedy soup, for any model.

    Each call loads the state dict into ``model`` (strictly: every key must match), recomputes the
    BatchNorm statistics on ``bn_batches`` batches of ``bn_loader`` when given, and returns
    ``evaluate(model)``. ``model``'s weights are overwritten on every call; the state dict is not.

    Args:
        model: a module of the members' architecture, on ``device``.
        evaluate: held-out score of a model, higher is better (:func:`model_evaluator`).
        bn_loader: training batches for :func:`merge.bn.recompute_bn` (None: no recalibration).
        bn_batches: how many of them (None: all).
        device, forward: passed to :func:`merge.bn.recompute_bn`.

    Returns:
        The score callback.

    Raises:
        MismatchError: (when called) the state dict's keys or shapes do not fit ``model``.

    Example:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> score = state_dict_scorer(net, lambda m: float(m.weight.detach().sum()))
        >>> score({"weight": torch.ones(2, 2)})
        4.0
    """

    def score(state_dict: Mapping[str, Tensor]) -> float:
        load_into(model, state_dict)
        if bn_loader is not None:
            from merge.bn import recompute_bn

            recompute_bn(model, bn_loader, num_batches=bn_batches, device=device, forward=forward)
        return float(evaluate(model))

    return score


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(state_dict)``, strict, with an error that names the mismatched tensors.

    Raises:
        MismatchError: missing or unexpected keys, or shapes that differ.
    """
    from merge.models import load_weights

    return load_weights(model, state_dict, what="the state dict's tensors")


def checkpoint_metadata(path: str | os.PathLike, *, need_data: bool = True,
                        need_model: bool = True) -> tuple[dict | None, dict | None, dict]:
    """The ``papa_merge.model`` and ``papa_merge.data`` specs of a checkpoint, and its raw metadata.

    Checkpoints papa-merge did not write (a ``.pth`` state dict, a plain safetensors file) have no
    metadata: their specs are None when not needed.

    Raises:
        MissingMetadataError: the checkpoint has no ``papa_merge.model`` (when ``need_model``) or no
            ``papa_merge.data`` (when ``need_data``), or the entry is not valid JSON; the message says
            how to fix it.
    """
    from merge.errors import MissingMetadataError
    from merge.io.sources import read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    specs = []
    for key, needed, what in ((MODEL_KEY, need_model, "the architecture to rebuild the model"),
                              (DATA_KEY, need_data, "the dataset and split seed to rebuild the data")):
        text = meta.get(key)
        if text is None:
            if needed:
                hint = ("name the dataset" if key == DATA_KEY else
                        "name the architecture (small_cnn, timm:<name>, hf:<folder>), write members with "
                        "papa-merge train / merge.train (which record it), or call merge.greedy_soup(paths, "
                        "score=...) from Python with your own evaluate callback")
                raise MissingMetadataError(f"{path}: has no {key!r} metadata ({what}), which greedy soup and "
                                           f"evaluation need; {hint}", path=path,
                                           option="data" if key == DATA_KEY else "model")
            specs.append(None)
            continue
        try:
            specs.append(json.loads(text))
        except ValueError:
            raise MissingMetadataError(f"{path}: its {key!r} metadata is not valid JSON ({text[:60]!r}); "
                                       "the checkpoint was not written by papa-merge") from None
    return specs[0], specs[1], meta


def _split_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    # Fields left unset (None) mean the same as absent ones: specs written by older versions lack them.
    return {k: v for k, v in spec.items() if v is not None}


def resolve_eval_data(data: Any, specs: Sequence[tuple[str, dict | None]]) -> Any:
    """The splits to evaluate checkpoints on: always the members' own split when they record one.

    The split (seed, val fraction, limit, preprocessing) comes from the checkpoints' ``papa_merge.data``
    metadata, so val and test are never rows the members trained on, however ``data`` is spelled
    (``csv:d.csv`` and ``csv:/abs/d.csv`` are one dataset). ``data`` only names the dataset: for
    checkpoints that record none (trained elsewhere), it is loaded with the default split.

    Args:
        data: None, a dataset name, or a ``Splits`` object (used as given).
        specs: ``(path, data spec or None)`` of each checkpoint.

    Returns:
        A ``Splits``.

    Raises:
        MismatchError: the checkpoints record different splits.
        InvalidArgumentError: ``data`` names another dataset than the one the checkpoints record.
        MissingMetadataError: no checkpoint records its data and ``data`` is None.
    """
    from merge.data import load_dataset, load_dataset_from_spec
    from merge.data.datasets import canonical_dataset_name
    from merge.errors import InvalidArgumentError, MismatchError, MissingMetadataError

    known = [(p, s) for p, s in specs if s is not None]
    if known:
        p0, s0 = known[0]
        for p, s in known[1:]:
            a, b = _split_fields(s0), _split_fields(s)
            if a != b:
                diff = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
                                 if a.get(k) != b.get(k))
                raise MismatchError(f"{p} and {p0} were trained on different data splits ({diff}); their val and "
                                    "test rows differ, so evaluate the checkpoints of one split at a time",
                                    path=p)
    if data is not None and not isinstance(data, str):
        return data  # the caller's own Splits, as given
    if known:
        p0, s0 = known[0]
        if data is not None and canonical_dataset_name(data) != s0.get("dataset"):
            raise InvalidArgumentError(
                f"data {data!r} is not the dataset {p0} was trained on ({s0.get('dataset')!r}); val and test "
                "come from the members' own split, which exists only for their dataset",
                path=p0, option="data", choices=(s0.get("dataset"),))
        return load_dataset_from_spec(s0)
    if data is None:
        p0 = specs[0][0] if specs else "the checkpoints"
        raise MissingMetadataError(f"{p0}: has no {DATA_KEY!r} metadata (the dataset and split seed to rebuild "
                                   "the data), which greedy soup and evaluation need; name the dataset",
                                   path=p0, option="data")
    import warnings

    splits = load_dataset(data)
    warnings.warn(f"the checkpoints record no data split, so val and test are papa-merge's default split of {data!r} "
                  f"(seed {splits.spec.get('seed')}, val fraction {splits.spec.get('val_fraction')}); if they were "
                  "trained on this dataset elsewhere, these rows may include their training rows", stacklevel=2)
    return splits


def eval_model_spec(model: str | Mapping[str, Any], splits: Any, *, num_classes: int | None = None,
                    in_chans: int | None = None, image_size: int | None = None) -> dict:
    """The model spec to evaluate checkpoints trained elsewhere: an architecture sized to the data.

    Args:
        model: ``small_cnn``, ``timm:<name>``, ``hf:<folder>``, or a full model spec dict.
        splits: the data (its class count, channels and image size are the defaults).
        num_classes, in_chans, image_size: override what the data implies.

    Raises:
        UnknownNameError: an unknown architecture.
    """
    from merge.models import model_spec

    if not isinstance(model, str):
        return dict(model)
    classes = int(num_classes if num_classes is not None else splits.num_classes)
    if model.startswith("hf:"):
        return model_spec(model, classes)
    chans = in_chans if in_chans is not None else (splits.in_chans if splits.kind == "image" else None)
    size = image_size if image_size is not None else (splits.image_size if splits.kind == "image" else None)
    return model_spec(model, classes, in_chans=chans, image_size=size)


def scoring_label(recompute_bn: int, batch_size: int) -> str:
    """How a score was obtained, for every printed or recorded score (``as stored`` or after recalibration)."""
    if not recompute_bn:
        return "as stored"
    return f"after BatchNorm recomputation on {recompute_bn} training batches of {batch_size}"


def _bar(iterable: Iterable[Any], *, enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """``iterable`` behind a transient progress bar on stderr when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


@dataclass
class EvalRow:
    """One line of an evaluation table: a member, a soup, or an ensemble, with metrics per split."""

    name: str
    kind: str  # "member" | "soup" | "ensemble" | "selection" | a summary such as "members mean"
    metrics: dict[str, dict[str, float]]  # split -> {"acc", "nll", "ece"}


class CheckpointEvaluator:
    """Scores checkpoints on the splits their metadata names, with one rebuilt model per architecture.

    Built by :meth:`from_checkpoints`; it caches the loaders, so scoring many candidate soups (greedy
    soup) rebuilds nothing. With ``progress``, every pass over data (evaluation, BatchNorm
    recalibration) shows a transient bar on stderr.
    """

    def __init__(self, model_meta: dict, splits: Any, *, batch_size: int = 256, device: str | torch.device = "cpu",
                 n_bins: int = 15, bn_seed: int = 0, progress: bool = False):
        from merge.engine import resolve_device
        from merge.models import rebuild_model

        self.model_meta, self.splits = model_meta, splits
        self.batch_size, self.n_bins, self.bn_seed = batch_size, n_bins, bn_seed
        self.progress = progress
        self.device = resolve_device(device)
        self.model = rebuild_model({MODEL_KEY: json.dumps(model_meta)}).to(self.device)
        self._loaders: dict[str, Any] = {}

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | os.PathLike], *, data: Any = None,
                         model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                         in_chans: int | None = None, image_size: int | None = None, batch_size: int = 256,
                         device: str | torch.device = "cpu", n_bins: int = 15,
                         progress: bool = False) -> CheckpointEvaluator:
        """The model and the data of ``paths``: from their metadata, or from ``model`` and ``data``.

        The split always comes from the checkpoints' ``papa_merge.data`` when they record it
        (:func:`resolve_eval_data`); ``model`` names the architecture of checkpoints that record none
        (:func:`eval_model_spec`), e.g. a timm state dict saved with ``torch.save``.

        Raises:
            MissingMetadataError: a checkpoint lacks the architecture (without ``model``), or no
                checkpoint records its data (without ``data``); checked for every path up front.
            MismatchError: the checkpoints describe different architectures or splits.
            InvalidArgumentError: ``data`` names another dataset than the checkpoints' own.
        """
        from merge.errors import InvalidArgumentError, MismatchError

        if not paths:
            raise InvalidArgumentError("no checkpoints given")
        metas = [checkpoint_metadata(p, need_data=False, need_model=model is None) for p in paths]
        model_meta = metas[0][0]
        if model is None:
            for p, (m, _d, _r) in zip(paths[1:], metas[1:]):
                if m != model_meta:
                    raise MismatchError(f"{p} is a {m.get('arch')!r} model {m}, but {paths[0]} is "
                                        f"{model_meta.get('arch')!r} {model_meta}; evaluate one architecture "
                                        "at a time")
        splits = resolve_eval_data(data, [(str(p), d) for p, (_m, d, _r) in zip(paths, metas)])
        if model is not None:
            model_meta = eval_model_spec(model, splits, num_classes=num_classes, in_chans=in_chans,
                                         image_size=image_size)
        return cls(model_meta, splits, batch_size=batch_size, device=device, n_bins=n_bins, progress=progress)

    def loader(self, split: str) -> Any:
        """The (cached) loader of ``split`` (``val`` or ``test``), in dataset order."""
        from merge.models import make_loader

        if split not in self._loaders:
            self._loaders[split] = make_loader(getattr(self.splits, split), self.model_meta,
                                               batch_size=self.batch_size)
        return self._loaders[split]

    def bn_loader(self, num_batches: int) -> Any:
        """``num_batches`` unaugmented training batches, the same ones on every call.

        A fixed, seeded subset rather than a reshuffling loader: every candidate soup of a greedy
        search, and the soup finally written, is recalibrated on exactly the same examples.
        """
        from torch.utils.data import Subset

        from merge.models import make_loader

        key = f"train:{num_batches}"
        if key not in self._loaders:
            train = self.splits.train
            g = torch.Generator().manual_seed(self.bn_seed)
            rows = torch.randperm(len(train), generator=g)[: num_batches * self.batch_size].tolist()
            subset = Subset(train, rows)
            subset.kind = getattr(train, "kind", None)  # make_loader reads the data kind from the dataset
            self._loaders[key] = make_loader(subset, self.model_meta, batch_size=self.batch_size)
        return self._loaders[key]

    def model_with(self, state_dict: Mapping[str, Tensor], *, recompute_bn: int = 0) -> nn.Module:
        """The evaluator's model holding ``state_dict``, BatchNorm recalibrated on ``recompute_bn`` train batches."""
        load_into(self.model, state_dict)
        if recompute_bn:
            from merge.bn import recompute_bn as _recompute

            loader = self.bn_loader(recompute_bn)
            batches = _bar(loader, enabled=self.progress, desc="BatchNorm statistics",
                           total=min(recompute_bn, len(loader)))
            _recompute(self.model, batches, num_batches=recompute_bn, device=self.device, forward=_forward_default)
        return self.model

    def predict_split(self, split: str) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` of the evaluator's model as it now is, on ``split``."""
        loader = self.loader(split)
        return predict(self.model, _bar(loader, enabled=self.progress, desc=f"evaluate on {split}",
                                        total=len(loader)), device=self.device)

    def logits(self, state_dict: Mapping[str, Tensor], split: str, *, recompute_bn: int = 0) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` of a state dict on ``split``."""
        self.model_with(state_dict, recompute_bn=recompute_bn)
        return self.predict_split(split)

    def scorer(self, *, split: str = "val", metric: str = "acc", recompute_bn: int = 0) -> StateDictScore:
        """``score(state_dict)`` on ``split``: ``acc``, or ``-nll`` for ``nll`` (higher is better)."""
        from merge.errors import InvalidArgumentError

        if metric not in ("acc", "nll"):
            raise InvalidArgumentError(f"metric must be 'acc' or 'nll', got {metric!r}")

        def score(state_dict: Mapping[str, Tensor]) -> float:
            logits, labels = self.logits(state_dict, split, recompute_bn=recompute_bn)
            m = metrics(logits, labels, n_bins=self.n_bins)
            return m["acc"] if metric == "acc" else -m["nll"]

        return score


def _is_soup(meta: Mapping[str, str]) -> bool:
    return RECIPE_KEY in meta


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _expand_manifests(paths: Sequence[str | os.PathLike], names: Sequence[str] | None
                      ) -> tuple[list[tuple[str, str | os.PathLike]], list[tuple[str, Any, list[int]]]]:
    """``(entries, selections)``: each checkpoint ``(display name, path)``, a manifest's members where it
    stands (each evaluated once, even if also listed), and per manifest ``(name, Selection, entry indices)``."""
    from merge.manifest import is_manifest, read_manifest

    entries: list[tuple[str, str | os.PathLike]] = []
    selections: list[tuple[str, Any, list[int]]] = []
    for i, p in enumerate(paths):
        label = str(names[i]) if names is not None else str(p)
        if not is_manifest(p):
            entries.append((label, p))
            continue
        sel = read_manifest(p)
        idx = []
        for m in sel.paths:
            found = next((j for j, (_n, q) in enumerate(entries) if _same_file(q, m)), None)
            if found is None:
                entries.append((str(m), m))
                found = len(entries) - 1
            idx.append(found)
        selections.append((label, sel, idx))
    return entries, selections


def evaluate_checkpoints(paths: Sequence[str | os.PathLike], *, data: Any = None,
                         model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                         in_chans: int | None = None, image_size: int | None = None, split: str = "both",
                         ensemble: bool = True, batch_size: int = 256, device: str | torch.device = "cpu",
                         recompute_bn: int = 0, n_bins: int = 15, names: Sequence[str] | None = None,
                         progress: bool = False,
                         on_row: Callable[[EvalRow], None] | None = None) -> list[EvalRow]:
    """Accuracy, NLL and ECE of each checkpoint, and of the prediction ensemble of the members.

    Checkpoints without a ``papa_merge.recipe`` are members; those with one are soups. The model is
    rebuilt from ``papa_merge.model`` (or ``model``) and the data split from ``papa_merge.data``
    (``data`` names the dataset of checkpoints that record none). A selection manifest
    (:mod:`merge.manifest`, written by ``papa-merge select``) among ``paths`` adds its members (each
    evaluated once) and a row for its ensemble, weighted by the pick counts.

    Args:
        paths: checkpoints (members or soups, one architecture) and selection manifests.
        data: a dataset name or ``Splits``; None: from the checkpoints' metadata.
        model, num_classes, in_chans, image_size: the architecture of checkpoints trained elsewhere
            (:func:`eval_model_spec`); None: from their metadata.
        split: ``val``, ``test`` or ``both``.
        ensemble: add a row for the prediction ensemble (mean of softmax probabilities) of the members
            (when there are at least two).
        batch_size, device: evaluation batch size and device.
        recompute_bn: recalibrate each checkpoint's BatchNorm statistics on this many training batches
            before evaluating it (0: evaluate as stored).
        names: display names of ``paths`` (default: the paths).
        progress: transient progress bars on stderr (evaluation, recalibration).
        on_row: called with each row as soon as it is computed (print results as they come).

    Returns:
        :class:`EvalRow` s: the checkpoints in the order given (a manifest's members where it stands),
        then the ``ensemble`` row, then one ``selection`` row per manifest.

    Raises:
        MissingMetadataError: a checkpoint lacks ``papa_merge.model`` (without ``model``), or the data
            is unknown (no ``papa_merge.data`` and no ``data``).
        InvalidArgumentError: an unknown split, or ``data`` naming another dataset than the members'.
        MismatchError: checkpoints of different architectures or splits.

    Example:
        >>> rows = evaluate_checkpoints(["m0.safetensors", "m1.safetensors"], split="test")  # doctest: +SKIP
        >>> print(format_table(rows, splits=["test"]))  # doctest: +SKIP
    """
    from merge.errors import InvalidArgumentError
    from merge.io.sources import open_checkpoint

    splits = _splits(split)
    if names is not None and len(names) != len(paths):
        raise InvalidArgumentError(f"{len(names)} names for {len(paths)} checkpoints")
    entries, selections = _expand_manifests(paths, names)
    ev = CheckpointEvaluator.from_checkpoints([q for _n, q in entries], data=data, model=model,
                                              num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                                              batch_size=batch_size, device=device, n_bins=n_bins, progress=progress)
    rows: list[EvalRow] = []
    logits_of: list[dict[str, Tensor]] = []
    member_idx: list[int] = []
    labels: dict[str, Tensor] = {}
    for i, (label, p) in enumerate(entries):
        with open_checkpoint(p) as src:
            sd, meta = src.state_dict(), dict(src.metadata)
        kind = "soup" if _is_soup(meta) else "member"
        row = EvalRow(label, kind, {})
        # Recalibrate once per checkpoint, then evaluate every split with the same statistics.
        ev.model_with(sd, recompute_bn=recompute_bn)
        logits_of.append({})
        for s in splits:
            logits_of[i][s], labels[s] = ev.predict_split(s)
            row.metrics[s] = metrics(logits_of[i][s], labels[s], n_bins=n_bins)
        if kind == "member":
            member_idx.append(i)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    extra: list[EvalRow] = []
    if ensemble and len(member_idx) >= 2:
        extra.append(EvalRow(f"ensemble of {len(member_idx)} members", "ensemble",
                             {s: metrics_from_probs(ensemble_probs([logits_of[i][s] for i in member_idx]),
                                                    labels[s], n_bins=n_bins) for s in splits}))
    for label, sel, idx in selections:
        name = f"{Path(label).name}: {len(idx)} members, weights {'+'.join(str(w) for w in sel.weights)}"
        extra.append(EvalRow(name, "selection",
                             {s: metrics_from_probs(ensemble_probs([logits_of[i][s] for i in idx],
                                                                   weights=sel.weights), labels[s], n_bins=n_bins)
                              for s in splits}))
    for row in extra:
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _splits(split: str) -> tuple[str, ...]:
    from merge.errors import InvalidArgumentError

    if split == "both":
        return SPLITS
    if split in SPLITS:
        return (split,)
    raise InvalidArgumentError(f"split must be one of val, test, both; got {split!r}")


def summarize_members(rows: Sequence[EvalRow]) -> list[EvalRow]:
    """Rows ``members mean``, ``members min`` and ``members max`` over the ``member`` rows, per metric.

    Min and max are taken per metric independently (the best accuracy and the best NLL may be two
    different members), as the papers' tables report them.
    """
    members = [r for r in rows if r.kind == "member"]
    if not members:
        return []
    out = []
    for label, fn in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        out.append(EvalRow(f"members {label} ({len(members)})", f"members {label}",
                           {s: {k: float(fn([r.metrics[s][k] for r in members])) for k in members[0].metrics[s]}
                            for s in members[0].metrics}))
    return out


class TableFormatter:
    """The evaluation table, one line at a time: a header, then each row as soon as it is known.

    Args:
        splits: the splits shown, in order.
        width: the width of the name column (names longer than it still print in full).
    """

    def __init__(self, splits: Sequence[str], *, width: int = 22):
        self.splits, self.width = list(splits), max(20, width) + 2

    @classmethod
    def for_names(cls, names: Iterable[str], splits: Sequence[str]) -> TableFormatter:
        return cls(splits, width=max([0, *(len(n) for n in names)]))

    def header(self) -> str:
        return "model".ljust(self.width) + "".join(f"{s + ' acc':>9s}{s + ' nll':>9s}{s + ' ece':>9s}"
                                                   for s in self.splits)

    def row(self, r: EvalRow) -> str:
        cells = ""
        for s in self.splits:
            m = r.metrics.get(s)
            cells += (f"{100 * m['acc']:8.2f}%{m['nll']:9.4f}{m['ece']:9.4f}" if m else f"{'-':>9s}" * 3)
        name = r.name.ljust(self.width) if len(r.name) < self.width else r.name + " "
        return name + cells


def format_table(rows: Sequence[EvalRow], *, splits: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per model, ``acc nll ece`` per split (accuracy in percent).

    Example:
        >>> r = EvalRow("m", "member", {"val": {"acc": 0.5, "nll": 0.7, "ece": 0.1}})
        >>> print(format_table([r]))
        model                   val acc  val nll  val ece
        m                        50.00%   0.7000   0.1000
    """
    if not rows:
        return ""
    fmt = TableFormatter.for_names([r.name for r in rows], list(splits or rows[0].metrics))
    return "\n".join([fmt.header(), *(fmt.row(r) for r in rows)])


def recompute_bn_checkpoint(path: str | os.PathLike, *, num_batches: int, data: Any = None, batch_size: int = 256,
                            device: str | torch.device = "cpu", state_dict: Mapping[str, Tensor] | None = None,
                            evaluator: CheckpointEvaluator | None = None, progress: bool = False) -> Path:
    """Rewrite a soup checkpoint in place with BatchNorm statistics recomputed on training batches.

    The model and the data are rebuilt from the checkpoint's metadata (``data`` overrides the data);
    the statistics come from :meth:`CheckpointEvaluator.bn_loader` (``num_batches`` fixed, seeded,
    unaugmented training batches). The weights are unchanged, the file is replaced atomically, and the
    recorded recipe gains ``bn_recomputed: {"batches", "batch_size", "split"}``.

    Args:
        path: a ``.safetensors`` checkpoint with ``papa_merge.model`` (and ``papa_merge.data``) metadata.
        num_batches: training batches to recompute the statistics on.
        data, batch_size, device: as in :func:`evaluate_checkpoints`.
        state_dict: the tensors to recalibrate, if already in memory (default: read from ``path``).
        evaluator: reuse this evaluator (its data, batch size and recalibration subset).
        progress: a transient progress bar on stderr over the batches.

    Returns:
        ``path``.

    Raises:
        MissingMetadataError: the checkpoint lacks the model (or data) metadata.
        InvalidArgumentError: ``path`` is not a single ``.safetensors`` file, or ``num_batches`` < 1.

    Example:
        >>> merge.soup(paths, out="soup.safetensors")  # doctest: +SKIP
        >>> recompute_bn_checkpoint("soup.safetensors", num_batches=20)  # doctest: +SKIP
    """
    from merge.errors import InvalidArgumentError
    from merge.io.sources import open_checkpoint
    from merge.io.writer import write_state_dict

    path = Path(path)
    if num_batches < 1:
        raise InvalidArgumentError(f"recompute_bn needs a positive number of batches, got {num_batches}")
    if path.suffix != ".safetensors" or not path.is_file():
        raise InvalidArgumentError(f"{path}: BatchNorm recalibration rewrites a single .safetensors file; "
                                   "write the soup with -o NAME.safetensors")
    ev = evaluator or CheckpointEvaluator.from_checkpoints([path], data=data, batch_size=batch_size, device=device,
                                                           progress=progress)
    with open_checkpoint(path) as src:
        meta = dict(src.metadata)
        if state_dict is None:
            state_dict = src.state_dict()
    model = ev.model_with(state_dict, recompute_bn=num_batches)
    new = model.state_dict()
    if RECIPE_KEY in meta:
        recipe = json.loads(meta[RECIPE_KEY])
        recipe["bn_recomputed"] = {"batches": num_batches, "batch_size": ev.batch_size, "split": "train",
                                   "seed": ev.bn_seed}
        meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
    meta.pop("format", None)
    # Same tensor names and order as the file; only BatchNorm buffers differ from what was there.
    write_state_dict({k: new[k] if k in new else state_dict[k] for k in state_dict}, path, metadata=meta, force=True)
    return path
