"""Collapse a late-phase checkpoint (K copies of its BatchNorm and head weights) into one plain model.

Late-phase weights (von Oswald et al., 2021; code seijin-kobayashi/late-phase-weights) train K copies
of a few layers, the *specialists*, with everything else shared. The reference evaluates the ensemble
by averaging, layer by layer, the outputs of the K copies (``set_average_specialists(True)`` in
``nets/hyper_layers.py``). For the two kinds of layers late-phase weights use, that average is itself
one layer of the same kind, so the collapse is exact:

- a linear head: ``mean_k(W_k x + b_k) = mean(W) x + mean(b)``;
- a BatchNorm layer in eval mode is a per-channel affine map ``y = s * x + t`` with
  ``s = gamma / sqrt(var + eps)`` and ``t = beta - s * mean``. The mean of K such maps is the map with
  the mean scale and the mean shift, written back as ``gamma = mean(s)``, ``beta = mean(t)``,
  ``running_mean = 0`` and ``running_var = 1 - eps`` (so that ``sqrt(var + eps) = 1``). Averaging
  gamma, beta and the statistics separately would be a different, wrong map.

The collapsed model loads strictly into the original architecture. Do not recompute its BatchNorm
statistics afterwards: the statistics written here are part of the collapse.

A late-phase checkpoint stores the shared tensors under their plain names, and copy ``k`` of module
``m``'s tensor ``t`` as ``late_phase.{k}.{m}.{t}``. Its ``papa_merge.train`` metadata holds
``late_phase = {"copies": K, "modules": {m: {"kind": "batchnorm" | "linear", "eps": ...}}, ...}``.

Example:
    >>> collapse_checkpoint("runs/lpw/late-phase/member-00.safetensors", out="model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import InvalidArgumentError, MismatchError, MissingMetadataError, SameInputOutputError
from merge.io.formats import SAFETENSORS_SUFFIX
from merge.io.sources import open_checkpoint
from merge.io.writer import write_state_dict
from merge.keys import RECIPE_KEY, TRAIN_KEY, version

__all__ = ["LATE_PHASE_PREFIX", "copy_name", "collapse_batchnorm", "collapse_state_dict", "collapse_checkpoint",
           "late_phase_info"]

LATE_PHASE_PREFIX = "late_phase."
CITATION = "von Oswald et al. 2021, Neural networks with late-phase weights; code seijin-kobayashi/late-phase-weights"


def copy_name(k: int, module: str, tensor: str) -> str:
    """The name under which copy ``k`` of ``module``'s ``tensor`` is stored in a late-phase checkpoint."""
    return f"{LATE_PHASE_PREFIX}{k}.{module}.{tensor}"


def collapse_batchnorm(weights: Sequence[Tensor], biases: Sequence[Tensor], means: Sequence[Tensor],
                       variances: Sequence[Tensor], *, eps: float) -> dict[str, Tensor]:
    """One BatchNorm layer equal, in eval mode, to the mean of K BatchNorm layers' outputs.

    Computed in float64: each copy's eval-mode map ``s_k * x + t_k`` (``s_k = w_k / sqrt(v_k + eps)``,
    ``t_k = b_k - s_k * m_k``), then ``gamma = mean(s)``, ``beta = mean(t)``, ``running_mean = 0``,
    ``running_var = 1 - eps``.

    Args:
        weights, biases, means, variances: one per copy, each of shape ``[C]``.
        eps: the layer's epsilon (the same for every copy).

    Returns:
        ``{"weight", "bias", "running_mean", "running_var"}`` in the dtype of ``weights[0]``.

    Raises:
        InvalidArgumentError: no copies, or copies of different lengths.

    Example:
        >>> out = collapse_batchnorm([torch.tensor([2.0])], [torch.tensor([1.0])], [torch.tensor([3.0])],
        ...                          [torch.tensor([4.0 - 1e-5])], eps=1e-5)
        >>> [round(float(out[k]), 4) for k in ("weight", "bias")]  # y = (x - 3) / 2 * 2 + 1 = x - 2
        [1.0, -2.0]
    """
    n = len(weights)
    if n == 0 or not (len(biases) == len(means) == len(variances) == n):
        raise InvalidArgumentError(f"collapse_batchnorm needs the same number (>0) of weights, biases, means and "
                                   f"variances; got {len(weights)}, {len(biases)}, {len(means)}, {len(variances)}")
    dtype = weights[0].dtype
    scale = torch.zeros_like(weights[0], dtype=torch.float64)
    shift = torch.zeros_like(scale)
    for w, b, m, v in zip(weights, biases, means, variances):
        s = w.double() / torch.sqrt(v.double() + eps)
        scale += s
        shift += b.double() - s * m.double()
    scale, shift = scale / n, shift / n
    return {"weight": scale.to(dtype), "bias": shift.to(dtype),
            "running_mean": torch.zeros_like(scale).to(means[0].dtype),
            "running_var": torch.full_like(scale, 1.0 - eps).to(variances[0].dtype)}


def late_phase_info(metadata: Mapping[str, str], *, path: object = None) -> dict[str, Any]:
    """The ``late_phase`` entry of a checkpoint's ``papa_merge.train`` metadata.

    Raises:
        MissingMetadataError: the checkpoint was not written by late-phase training.
    """
    try:
        info = json.loads(metadata[TRAIN_KEY])["late_phase"]
        int(info["copies"]), dict(info["modules"])
    except (KeyError, ValueError, TypeError):
        raise MissingMetadataError(f"{path or 'the checkpoint'}: not a late-phase checkpoint (its {TRAIN_KEY!r} "
                                   "metadata has no 'late_phase' entry with 'copies' and 'modules'); train it with "
                                   "method 'late-phase'", path=path) from None
    if info.get("collapsed"):
        raise InvalidArgumentError(f"{path or 'the checkpoint'}: is already collapsed (a plain model); collapse the "
                                   "late-phase checkpoint it came from (the late-phase/ folder of the run)", path=path)
    return info


def collapse_state_dict(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> dict[str, Tensor]:
    """The plain state dict of a late-phase state dict: shared tensors kept, each module's K copies collapsed.

    Args:
        tensors: shared tensors under their plain names and ``late_phase.{k}.{module}.{tensor}`` copies.
        info: ``{"copies": K, "modules": {name: {"kind": "batchnorm" | "linear", "eps": float}}}``.

    Returns:
        A new state dict with the original architecture's names (shared tensors first, in their order,
        then the collapsed modules' tensors).

    Raises:
        MismatchError: a copy is missing, copies disagree in shape, or a module kind is unknown.
    """
    k = int(info["copies"])
    modules: Mapping[str, Mapping[str, Any]] = info["modules"]
    out = {name: t for name, t in tensors.items() if not name.startswith(LATE_PHASE_PREFIX)}

    def copies(module: str, tensor: str, *, needed: bool = True) -> list[Tensor] | None:
        names = [copy_name(i, module, tensor) for i in range(k)]
        missing = [n for n in names if n not in tensors]
        if missing:
            if not needed and len(missing) == k:
                return None
            raise MismatchError(f"late-phase checkpoint lacks {len(missing)} of the {k} copies of {module}.{tensor} "
                                f"(e.g. {missing[0]}); it is incomplete", tensor=missing[0])
        shapes = {tuple(tensors[n].shape) for n in names}
        if len(shapes) > 1:
            raise MismatchError(f"the copies of {module}.{tensor} differ in shape: {sorted(shapes)}",
                                tensor=f"{module}.{tensor}")
        return [tensors[n] for n in names]

    for module, spec in modules.items():
        kind = spec.get("kind")
        if kind == "batchnorm":
            c = {t: copies(module, t) for t in ("weight", "bias", "running_mean", "running_var")}
            collapsed = collapse_batchnorm(c["weight"], c["bias"], c["running_mean"], c["running_var"],
                                           eps=float(spec["eps"]))
            for t, v in collapsed.items():
                out[f"{module}.{t}"] = v
            count = copies(module, "num_batches_tracked", needed=False)
            if count is not None:
                out[f"{module}.num_batches_tracked"] = torch.stack(count).max().to(count[0].dtype)
        elif kind == "linear":
            for t in ("weight", "bias"):
                c = copies(module, t, needed=t == "weight")
                if c is not None:
                    out[f"{module}.{t}"] = (torch.stack([x.double() for x in c]).mean(0)).to(c[0].dtype)
        else:
            raise MismatchError(f"late-phase module {module} has unknown kind {kind!r}; expected batchnorm or linear",
                                tensor=module)
    return out


def collapse_checkpoint(path: str | os.PathLike, *, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the plain model of a late-phase checkpoint (``papa-merge collapse``).

    The output keeps the checkpoint's ``papa_merge.model`` and ``papa_merge.data`` (so it evaluates like
    any member), marks its ``papa_merge.train`` as collapsed, keeps its metrics (the collapse is the same
    function the late-phase model computes in eval mode) and records the collapse in ``papa_merge.recipe``.

    Args:
        path: a late-phase checkpoint written by method ``late-phase`` (``OUT/late-phase/member-NN.safetensors``).
        out: the ``.safetensors`` file to write.
        force: replace an existing ``out``.

    Returns:
        The path written.

    Raises:
        MissingMetadataError: ``path`` is not a late-phase checkpoint.
        MismatchError: copies missing or inconsistent.
        OutputExistsError: ``out`` exists and ``force`` is False.
        SameInputOutputError: ``out`` is ``path``.

    Example:
        >>> collapse_checkpoint("lpw/late-phase/member-00.safetensors", out="model.safetensors")  # doctest: +SKIP
    """
    out = Path(out)
    if out.suffix != SAFETENSORS_SUFFIX:
        raise InvalidArgumentError(f"{out}: a collapsed model is one .safetensors file; end the path in .safetensors",
                                   option="out")
    if out.exists() and out.resolve() == Path(path).resolve():
        raise SameInputOutputError(f"{out}: is the late-phase checkpoint itself; write the collapsed model elsewhere",
                                   path=out)
    with open_checkpoint(path) as src:
        meta = dict(src.metadata)
        info = late_phase_info(meta, path=path)
        tensors = src.state_dict()
        fingerprint = src.fingerprint()
    plain = collapse_state_dict(tensors, info)
    train = json.loads(meta[TRAIN_KEY])
    train["late_phase"] = {**info, "collapsed": True}
    meta[TRAIN_KEY] = json.dumps(train, sort_keys=True)
    meta[RECIPE_KEY] = json.dumps({"tool": "papa-merge", "version": version(), "method": "late-phase-collapse",
                                   "citation": CITATION, "members": [fingerprint], "copies": int(info["copies"]),
                                   "modules": sorted(info["modules"])}, sort_keys=True)
    meta.pop("format", None)
    return write_state_dict(plain, out, metadata=meta, force=force)
