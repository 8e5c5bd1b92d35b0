"""Hyperparameter ensembles and hyper-deep ensembles (Wenzel et al., 2020), end to end.

The paper's procedure (and its reference code, google/uncertainty-baselines:
``baselines/cifar/hyperdeepensemble.py`` for the selection, ``hyperdeepensemble_configs/`` for the
sweeps), numbered as the code below follows it:

1. **Random search** over a pool of K configurations: the default configuration first (the reference
   sweep's run 0), then K-1 random draws, each knob on its own scale (learning rate, weight decay and
   label smoothing log-uniform; dropout uniform where the network has dropout), each configuration
   with its own random seed (stratified: every seed appears once).
2. **Hyper-ensemble**: greedy selection (Caruana et al., 2004) with replacement, by validation NLL of
   the averaged probabilities, until the ensemble holds k distinct members
   (:func:`merge.greedy.ensemble_selection`, a port of the reference's ``greedy_selection``).
3. **Hyper-deep ensemble**: every selected configuration is trained again over several init seeds,
   the same seeds for every configuration (stratified), and the greedy selection runs again over that
   larger pool, to k distinct members.

Both selections are written as manifests (``hyper-ensemble.json``, ``hyper-deep.json``) that
``papa-merge eval`` and ``papa-merge soup --weights-from`` read; the greedy soup of each pool
(model soups' rule) is written beside them, and the report compares them on val and test.

Deliberate differences from the paper and its code, each for a reason:

- The retraining pool reuses each selected configuration's original run as one of its seeds instead
  of training it again: it *is* a run of that configuration from one random seed (training here is
  deterministic), so the pool is the same and costs one run less per configuration.
- The reference retrains the selected configurations on train+val before testing; we keep the
  validation split held out, so the second selection and the reported val numbers stay honest.
- The search space: one weight decay (the reference searches L2 per layer group) and the learning
  rate; label smoothing as in the reference (log-uniform in [1e-5, 0.2]).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from merge.bn import bn_layers
from merge.errors import InvalidArgumentError, MismatchError
from merge.evaluate import CheckpointEvaluator, EvalRow, ensemble_probs, format_table, metrics, metrics_from_probs
from merge.greedy import greedy_soup_checkpoints, select_checkpoints
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.keys import TRAIN_KEY
from merge.params import Param
from merge.train.kit import check_resumable, member_path, prepare
from merge.train.loop import Callback, TrainState
from merge.train.members import train_member
from merge.train.recipe import Recipe, default_recipe, default_search_space, sample_recipes
from merge.train.registry import TrainJob, TrainResult, register_method

__all__ = ["HyperConfig", "hyper_configs", "set_dropout", "has_dropout", "DropoutRate", "train_hyper_ensemble",
           "train_hyper_deep", "HYPER_CITATION", "DROPOUT_RANGE"]

HYPER_CITATION = ("Wenzel et al. 2020, Hyperparameter Ensembles for Robustness and Uncertainty Quantification "
                  "(NeurIPS); code google/uncertainty-baselines baselines/cifar/hyperdeepensemble.py")
# Dropout acts on a linear scale (a probability): drawn uniformly.
DROPOUT_RANGE = (0.0, 0.5)
# Init seeds of the retraining stage are offset from the pool's, so the two never collide.
RETRAIN_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class HyperConfig:
    """One configuration of the random search: a recipe, and the network's dropout rate if it has dropout.

    Attributes:
        recipe: the training hyperparameters and seeds.
        dropout: the probability of every dropout layer (None: the network's own default).
    """

    recipe: Recipe
    dropout: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), "dropout": self.dropout}


# --------------------------------------------------------------------------------------------------
# Dropout: a property of the network, set on it before training


def _dropout_targets(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    # timm classifiers apply dropout functionally from a ``drop_rate`` attribute (ResNets, EfficientNets).
    attrs = [m for m in model.modules() if isinstance(getattr(m, "drop_rate", None), (int, float))
             and not isinstance(m.drop_rate, bool)]
    return layers, attrs


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has dropout to tune: ``nn.Dropout`` layers, or a timm ``drop_rate``."""
    layers, attrs = _dropout_targets(model)
    return bool(layers or attrs)


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout probability of ``model`` to ``p`` (``nn.Dropout*`` layers and timm's ``drop_rate``).

    Returns:
        How many layers or attributes were set (0: the network has no dropout).

    Raises:
        InvalidArgumentError: ``p`` outside [0, 1).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        >>> set_dropout(net, 0.3), net[1].p
        (1, 0.3)
    """
    if not 0.0 <= p < 1.0:
        raise InvalidArgumentError(f"dropout must be in [0, 1), got {p}")
    layers, attrs = _dropout_targets(model)
    for m in layers:
        m.p = float(p)
    for m in attrs:
        m.drop_rate = float(p)
    return len(layers) + len(attrs)


class DropoutRate(Callback):
    """Set the members' dropout before training, and record the configuration in the member's metadata.

    Args:
        p: the dropout probability (None: leave the network's own).
        record: extra fields for the member's ``papa_merge.train`` entry (stage, configuration index).
    """

    def __init__(self, p: float | None, record: Mapping[str, Any] | None = None):
        self.p, self.record = p, dict(record or {})

    def on_train_begin(self, state: TrainState) -> None:
        if self.p is not None:
            for m in state.models:
                if not set_dropout(m, self.p):
                    raise InvalidArgumentError(f"{type(m).__name__} has no dropout layer; its configurations "
                                               "cannot set dropout")
        state.log["dropout"] = self.p
        state.log["hyper"] = self.record


# --------------------------------------------------------------------------------------------------
# Step 1: the random search's configurations


def hyper_configs(k: int, *, base: Recipe, seed: int = 0, search_space: Mapping[str, Any] | None = None,
                  dropout: bool = False, include_default: bool = True) -> list[HyperConfig]:
    """The pool of the random search: the default configuration, then ``k - 1`` random ones.

    Args:
        k: pool size K.
        base: the default recipe (configuration 0; the others keep its untuned fields).
        seed: configuration i trains with seed ``seed + i`` (stratified: one seed per configuration);
            also seeds the draws.
        search_space: recipe fields to draw (default :func:`merge.train.default_search_space`).
        dropout: also draw dropout uniformly in :data:`DROPOUT_RANGE` (networks that have dropout).
        include_default: make configuration 0 the base recipe, as the reference sweep does.

    Returns:
        ``k`` configurations, configuration 0 first.

    Raises:
        InvalidArgumentError: ``k`` < 1; as :func:`merge.train.sample_recipes` for the space.

    Example:
        >>> cfgs = hyper_configs(4, base=Recipe(lr=0.05), seed=0)
        >>> cfgs[0].recipe.lr, [c.recipe.seed for c in cfgs]
        (0.05, [0, 1, 2, 3])
    """
    if k < 1:
        raise InvalidArgumentError(f"a random search needs at least one configuration, got pool={k}")
    space = dict(search_space if search_space is not None else default_search_space(base))
    first = [HyperConfig(dataclasses.replace(base, seed=seed, data_seed=seed))] if include_default else []
    n = k - len(first)
    if n == 0:
        return first
    start = len(first)
    recipes = sample_recipes(n, search_space=space, seeds=[seed + start + i for i in range(n)], seed=seed, base=base)
    # sample_recipes deals the seeds out in a shuffled order; configuration i takes seed seed + i.
    recipes = sorted(recipes, key=lambda r: r.seed)
    rng = np.random.default_rng([seed, 17])
    drops = [float(rng.uniform(*DROPOUT_RANGE)) if dropout else None for _ in range(n)]
    return first + [HyperConfig(r, d) for r, d in zip(recipes, drops)]


# --------------------------------------------------------------------------------------------------
# Training a set of configurations (resumable, member by member)


def _check_config_resumable(path: Path, config: HyperConfig, *, spec: dict, data_spec: dict) -> None:
    check_resumable(path, config.recipe, "independent", spec=spec, data_spec=data_spec)
    stored = json.loads(read_safetensors_metadata(path).get(TRAIN_KEY, "{}")).get("dropout")
    if stored != config.dropout:
        raise MismatchError(f"{path}: exists but was trained with dropout {stored!r}, not {config.dropout!r}; "
                            "resuming would mix runs, so choose another output folder or delete the file", path=path)


def _train_configs(job: TrainJob, configs: Sequence[HyperConfig], out_dir: Path, *, spec: dict, splits: Any,
                   stage: str, labels: Sequence[str], offset: int = 0) -> list[Path]:
    paths = []
    for i, (cfg, label) in enumerate(zip(configs, labels)):
        p = member_path(out_dir, i, arch=spec["arch"])  # a folder its library loads for timm:/hf:, else a file
        if p.exists() and not job.force:
            _check_config_resumable(p, cfg, spec=spec, data_spec=splits.spec)
            job.member_done(offset + i, p, kept=True)
        else:
            record = {"stage": stage, "config": label}
            train_member(cfg.recipe, model=spec, data=splits, out=p, pretrained=job.pretrained, device=job.device,
                         progress=job.progress, callbacks=[*job.callbacks, DropoutRate(cfg.dropout, record)],
                         eval_batch_size=job.eval_batch_size, init=job.init, force=job.force,
                         desc=f"{stage} {i + 1}/{len(configs)}")
            job.member_done(offset + i, p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------------
# Steps 2 and 3: selection, retraining, selection; both reported with the greedy soup of the same pool


def _stage(job: TrainJob, paths: list[Path], *, name: str, select: int, by: str, recompute_bn: int, ev: Any,
           logits: dict[Path, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Select from ``paths`` (write the manifest), make the pool's greedy soup, and score both on val and test."""
    out_dir = Path(job.out_dir)
    for p in paths:
        if p not in logits:
            with _open(p) as sd:
                logits[p] = {s: ev.logits(sd, s)[0] for s in ("val", "test")}
    labels = {s: torch.as_tensor(getattr(ev.splits, s).labels).long() for s in ("val", "test")}
    manifest = out_dir / f"{name}.json"
    sel = select_checkpoints([str(p) for p in paths], size=select, by=by, data=ev.splits,
                             batch_size=job.eval_batch_size, device=job.device, out=manifest, force=True,
                             logits=[logits[p]["val"] for p in paths])
    chosen = [Path(p) for p in sel.paths]
    ens = {s: metrics_from_probs(ensemble_probs([logits[p][s] for p in chosen], weights=sel.weights), labels[s],
                                 n_bins=ev.n_bins) for s in ("val", "test")}
    # The best single member by val NLL: what the random search alone would deliver.
    best = min(paths, key=lambda p: metrics(logits[p]["val"], labels["val"])["nll"])
    single = {s: metrics(logits[best][s], labels[s]) for s in ("val", "test")}
    soup_path = out_dir / f"{name}-greedy-soup.safetensors"
    result, soup_path = greedy_soup_checkpoints([str(p) for p in paths], out=soup_path, data=ev.splits,
                                                recompute_bn=recompute_bn, batch_size=job.eval_batch_size,
                                                device=job.device, force=True)
    with _open(soup_path) as sd:
        soup_logits = {s: ev.logits(sd, s)[0] for s in ("val", "test")}
    soup = {s: metrics(soup_logits[s], labels[s]) for s in ("val", "test")}
    weights = "+".join(str(w) for w in sel.weights)
    rows = [EvalRow(f"{name}: best member of {len(paths)} (val nll)", "member", single),
            EvalRow(f"{name}: ensemble of {len(chosen)} (weights {weights})", "selection", ens),
            EvalRow(f"{name}: greedy soup of {len(paths)} ({len(result.selected)} kept)", "soup", soup)]
    return {"selection": sel, "manifest": manifest, "soup": soup_path, "soup_result": result, "rows": rows}


class _open:
    """``with _open(path) as state_dict``: a checkpoint's tensors, the file closed after."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.src = open_checkpoint(self.path)
        return self.src.state_dict()

    def __exit__(self, *exc: object) -> None:
        self.src.close()


def _retrain(job: TrainJob, configs: Sequence[HyperConfig], pool_paths: Sequence[Path], selected: Sequence[int], *,
             seeds: int, spec: dict, splits: Any) -> tuple[list[Path], list[Path]]:
    """Train each selected configuration over ``seeds`` init seeds, the same seeds for all (stratified).

    Seed 0 of each configuration is its pool run itself. Returns the new members and the whole
    retraining pool (per configuration: its pool run, then its new runs).
    """
    retrain, labels = [], []
    for c in selected:
        for j in range(1, seeds):
            s = job.seed + RETRAIN_SEED_OFFSET + j
            retrain.append(dataclasses.replace(configs[c], recipe=dataclasses.replace(configs[c].recipe, seed=s,
                                                                                     data_seed=s)))
            labels.append(f"config {c}, seed {s}")
    new = _train_configs(job, retrain, Path(job.out_dir) / "hyper-deep", spec=spec, splits=splits, stage="hyper-deep",
                         labels=labels, offset=len(pool_paths))
    per = seeds - 1
    deep_pool = [p for k, c in enumerate(selected) for p in [pool_paths[c], *new[k * per:(k + 1) * per]]]
    return new, deep_pool


def _run(job: TrainJob, *, pool: int | None, select: int, seeds: int | None, by: str, recompute_bn: int | None,
         deep: bool) -> TrainResult:
    if job.diversity not in ("seed", "hparams"):
        raise InvalidArgumentError(f"hyperparameter ensembles draw their own diversity (a random search over "
                                   f"hyperparameters, one seed per configuration); diversity={job.diversity!r} "
                                   "does not apply", option="diversity", choices=("hparams",))
    pool = job.members if pool is None else int(pool)
    if pool < 1 or select < 1:
        raise InvalidArgumentError(f"need pool >= 1 and select >= 1; got pool={pool}, select={select}",
                                   option="select")
    seeds = select if seeds is None else int(seeds)
    if seeds < 1:
        raise InvalidArgumentError(f"hyper-deep ensembles train each selected configuration over at least one "
                                   f"seed; got seeds={seeds}", option="seeds")
    if by not in ("nll", "acc"):
        raise InvalidArgumentError(f"selection objective must be nll or acc, got {by!r}", option="by",
                                   choices=("nll", "acc"))
    ready = prepare(job, recipes=False)
    splits, spec = ready.splits, ready.spec
    ev = CheckpointEvaluator(spec, splits, batch_size=job.eval_batch_size, device=job.device)
    if recompute_bn is None:
        recompute_bn = 20 if bn_layers(ev.model) else 0  # soups of BatchNorm networks need recalibration
    out_dir = Path(job.out_dir)
    # 1. The random search: the job's own recipes as the pool, or K configurations around the default.
    if job.recipes is not None:
        configs = [HyperConfig(r) for r in job.recipes]
    else:
        base = job.base or default_recipe(job.arch, pretrained=job.pretrained is not None or job.arch.startswith("hf:"))
        configs = hyper_configs(pool, base=base, seed=job.seed, dropout=has_dropout(ev.model))
    pool_paths = _train_configs(job, configs, out_dir, spec=spec, splits=splits, stage="pool",
                                labels=[f"config {i}" for i in range(len(configs))])
    logits: dict[Path, dict[str, torch.Tensor]] = {}
    # 2. Hyper-ensemble: greedy selection with replacement to `select` distinct members.
    first = _stage(job, pool_paths, name="hyper-ensemble", select=select, by=by, recompute_bn=recompute_bn, ev=ev,
                   logits=logits)
    outputs = {"hyper-ensemble": first["manifest"], "hyper-ensemble greedy soup": first["soup"]}
    rows = list(first["rows"])
    report: dict[str, Any] = {"pool": [str(p) for p in pool_paths], "configs": [c.to_dict() for c in configs],
                              "hyper-ensemble": first["selection"].record()}
    paths = list(pool_paths)
    if deep:
        # 3. Hyper-deep: each selected configuration over `seeds` init seeds, selected again.
        selected = [pool_paths.index(Path(p)) for p in first["selection"].paths]
        new, deep_pool = _retrain(job, configs, pool_paths, selected, seeds=seeds, spec=spec, splits=splits)
        second = _stage(job, deep_pool, name="hyper-deep", select=select, by=by, recompute_bn=recompute_bn, ev=ev,
                        logits=logits)
        outputs.update({"hyper-deep": second["manifest"], "hyper-deep greedy soup": second["soup"]})
        rows += second["rows"]
        report["hyper-deep"] = second["selection"].record()
        report["hyper-deep pool"] = [str(p) for p in deep_pool]
        paths += new
    report["rows"] = [{"name": r.name, "kind": r.kind, "metrics": r.metrics} for r in rows]
    report["table"] = format_table(rows)
    return TrainResult(paths, outputs, report)


_HYPER_PARAMS = (
    Param("pool", None, int, low=1, help="configurations in the random search (default: the members)"),
    Param("select", 3, int, low=1, help="distinct members the greedy selection keeps"),
    # (nll or acc, checked by the method with the selection's own message)
    Param("by", "nll", str, help="what each pick improves on val: nll (the paper's) or acc"),
    Param("recompute_bn", None, int, low=0,
          help="training batches to recalibrate BatchNorm of the greedy soup's candidates (default: 20 for "
               "BatchNorm networks, else 0)"),
)
_HYPER_DEEP_PARAMS = (
    *_HYPER_PARAMS[:2],
    # (>= 1, checked by the method with a message that says why)
    Param("seeds", None, int, help="init seeds each selected configuration is trained with (default: select)"),
    *_HYPER_PARAMS[2:],
)


@register_method("hyper-ensemble", citation=HYPER_CITATION,
                 summary="random search over a pool of K configurations (pool), then greedy selection with "
                         "replacement by val NLL to k distinct members (select)",
                 params=_HYPER_PARAMS)
def train_hyper_ensemble(job: TrainJob, *, pool: int | None = None, select: int = 3, by: str = "nll",
                         recompute_bn: int | None = None) -> TrainResult:
    """A hyperparameter ensemble: random search, then greedy selection (steps 1 and 2 of the module doc).

    Args:
        job: what to train; ``job.members`` is the pool size unless ``pool`` is given, ``job.recipes``
            (if given) is the pool itself, ``job.seed`` seeds the search.
        pool: K, configurations in the random search.
        select: k, distinct members of the ensemble.
        by: selection objective on val: ``nll`` (the paper's) or ``acc``.
        recompute_bn: training batches to recalibrate BatchNorm of the greedy soup's candidates
            (default 20 for BatchNorm networks, else 0).

    Returns:
        ``paths``: the pool; ``outputs``: ``hyper-ensemble`` (the manifest) and its greedy soup;
        ``report``: the selection and a val/test ``table``.

    Raises:
        InvalidArgumentError: bad pool/select/by, or a diversity other than ``hparams``.

    Example:
        >>> job = TrainJob(model="small_cnn", data="digits", out_dir="hyper/", members=8)
        >>> run_method("hyper-ensemble", job, select=3).outputs["hyper-ensemble"]  # doctest: +SKIP
    """
    return _run(job, pool=pool, select=select, seeds=None, by=by, recompute_bn=recompute_bn, deep=False)


@register_method("hyper-deep", citation=HYPER_CITATION,
                 summary="hyper-ensemble, then each selected configuration retrained over several init seeds "
                         "(seeds, stratified) and selected again",
                 params=_HYPER_DEEP_PARAMS)
def train_hyper_deep(job: TrainJob, *, pool: int | None = None, select: int = 3, seeds: int | None = None,
                     by: str = "nll", recompute_bn: int | None = None) -> TrainResult:
    """A hyper-deep ensemble: steps 1 to 3 of the module doc; reports the hyper-ensemble too.

    Args:
        job, pool, select, by, recompute_bn: as in :func:`train_hyper_ensemble`.
        seeds: init seeds per selected configuration in the retraining pool (default ``select``, the
            paper's K); one of them is the configuration's pool run.

    Returns:
        ``paths``: the pool, then the retrained members (``hyper-deep/member-NN``); ``outputs``: both
        manifests and both greedy soups; ``report``: both selections and the val/test ``table``.

    Example:
        >>> job = TrainJob(model="small_cnn", data="digits", out_dir="hyper/", members=8)
        >>> run_method("hyper-deep", job, select=3).outputs["hyper-deep"]  # doctest: +SKIP
    """
    return _run(job, pool=pool, select=select, seeds=seeds, by=by, recompute_bn=recompute_bn, deep=True)
