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
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.engine import NonFiniteError
from merge.errors import CheckpointFormatError, InvalidArgumentError, MismatchError, MissingMetadataError, \
    NonFiniteWarning, SameInputOutputError
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
        InvalidArgumentError: no copies, copies of different lengths, or ``eps`` not a positive number.

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
    if not _positive_number(eps):
        raise InvalidArgumentError(f"collapse_batchnorm: eps must be a positive number, got {eps!r}")
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


def _positive_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def late_phase_info(metadata: Mapping[str, str], *, path: object = None) -> dict[str, Any]:
    """The ``late_phase`` entry of a checkpoint's ``papa_merge.train`` metadata, checked field by field.

    Raises:
        MissingMetadataError: the checkpoint was not written by late-phase training.
        CheckpointFormatError: a field holds an impossible value (``copies`` not a positive integer, a
            BatchNorm ``eps`` not a positive number, an unknown module kind); the message names the field.
    """
    where = path or "the checkpoint"
    try:
        info = json.loads(metadata[TRAIN_KEY])["late_phase"]
        info["copies"], dict(info["modules"])
    except (KeyError, ValueError, TypeError, RecursionError):
        raise MissingMetadataError(f"{where}: not a late-phase checkpoint (its {TRAIN_KEY!r} "
                                   "metadata has no 'late_phase' entry with 'copies' and 'modules'); train it with "
                                   "method 'late-phase'", path=path) from None
    if info.get("collapsed"):
        raise InvalidArgumentError(f"{where}: is already collapsed (a plain model); collapse the "
                                   "late-phase checkpoint it came from (the late-phase/ folder of the run)", path=path)

    def impossible(field: str, value: object, want: str) -> CheckpointFormatError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        return CheckpointFormatError(f"{where}: its late-phase metadata field {field!r} is {shown}, but must be "
                                     f"{want}; the checkpoint was not written by late-phase training as it is (or "
                                     "was edited): collapse the checkpoint the run wrote", path=path)

    copies = info["copies"]
    if not (isinstance(copies, int) and not isinstance(copies, bool) and copies >= 1):
        raise impossible("copies", copies, "a positive whole number (the K copies of each late-phase layer)")
    for name, spec in dict(info["modules"]).items():
        if not isinstance(spec, Mapping):
            raise impossible(f"modules.{name}", spec, 'an entry {"kind": "batchnorm" | "linear", ...}')
        kind = spec.get("kind")
        if kind not in ("batchnorm", "linear"):
            raise impossible(f"modules.{name}.kind", kind, "'batchnorm' or 'linear'")
        if kind == "batchnorm" and not _positive_number(spec.get("eps")):
            raise impossible(f"modules.{name}.eps", spec.get("eps"), "a positive number (BatchNorm's epsilon)")
    return info


def _check_finite(module: str, tensor: str, copies: Sequence[Tensor], *, strict: bool, path: object) -> None:
    """Warn (``strict``: refuse) when a copy holds NaN or infinity: the collapse carries it into the plain model."""
    for k, t in enumerate(copies):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            msg = (f"{path or 'the checkpoint'}: copy {k} of {module}.{tensor} holds NaN or infinite values "
                   f"({copy_name(k, module, tensor)}); the collapse carries them into {module} of the plain model")
            if strict:
                raise NonFiniteError(msg.split("; ")[0], path=path, tensor=copy_name(k, module, tensor))
            warnings.warn(NonFiniteWarning(msg), stacklevel=4)


def _check_variances(module: str, variances: Sequence[Tensor], eps: float, *, strict: bool, path: object) -> None:
    """Warn (``strict``: refuse) on running variances with ``var + eps <= 0``: no BatchNorm divides by their root."""
    for k, v in enumerate(variances):
        bad = int((v.double() + eps <= 0).sum())
        if bad:
            msg = (f"{path or 'the checkpoint'}: copy {k} of {module}.running_var holds {bad} negative "
                   f"variance{'s' if bad > 1 else ''} ({copy_name(k, module, 'running_var')}); the collapsed "
                   f"{module} is NaN in {'those channels' if bad > 1 else 'that channel'}")
            if strict:
                raise NonFiniteError(msg.split("; ")[0], path=path, tensor=copy_name(k, module, "running_var"))
            warnings.warn(NonFiniteWarning(msg), stacklevel=4)


def collapse_state_dict(tensors: Mapping[str, Tensor], info: Mapping[str, Any], *, strict: bool = False,
                        path: object = None) -> dict[str, Tensor]:
    """The plain state dict of a late-phase state dict: shared tensors kept, each module's K copies collapsed.

    A copy holding NaN or infinity, or a running variance with ``var + eps <= 0``, makes the collapsed
    module NaN where it is: a :class:`NonFiniteWarning` names the copy (``strict``: a :class:`NonFiniteError`).

    Args:
        tensors: shared tensors under their plain names and ``late_phase.{k}.{module}.{tensor}`` copies.
        info: ``{"copies": K, "modules": {name: {"kind": "batchnorm" | "linear", "eps": float}}}``.
        strict: refuse non-finite copies and impossible variances instead of warning.
        path: the checkpoint, named in warnings and errors.

    Returns:
        A new state dict with the original architecture's names (shared tensors first, in their order,
        then the collapsed modules' tensors).

    Raises:
        MismatchError: a copy is missing, copies disagree in shape, or a module kind is unknown.
        NonFiniteError: ``strict`` and a copy holds NaN/infinity or a negative variance; or every copy is
            finite and the collapsed tensor overflows its dtype.
    """
    k = int(info["copies"])
    modules: Mapping[str, Mapping[str, Any]] = info["modules"]
    held = sum(1 for name in tensors if name.startswith(LATE_PHASE_PREFIX))
    if modules and k > held:  # before listing k names of copies that cannot all be there
        raise MismatchError(f"late-phase metadata records {k} copies of {len(modules)} module(s), but the checkpoint "
                            f"holds {held} late-phase tensors; it is incomplete or its metadata is wrong")
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
            eps = float(spec["eps"])
            for t, group in c.items():
                _check_finite(module, t, group, strict=strict, path=path)
            _check_variances(module, c["running_var"], eps, strict=strict, path=path)
            collapsed = collapse_batchnorm(c["weight"], c["bias"], c["running_mean"], c["running_var"], eps=eps)
            _check_overflow(module, c, collapsed, eps)
            for t, v in collapsed.items():
                out[f"{module}.{t}"] = v
            count = copies(module, "num_batches_tracked", needed=False)
            if count is not None:
                out[f"{module}.num_batches_tracked"] = torch.stack(count).max().to(count[0].dtype)
        elif kind == "linear":
            for t in ("weight", "bias"):
                c = copies(module, t, needed=t == "weight")
                if c is not None:
                    _check_finite(module, t, c, strict=strict, path=path)
                    out[f"{module}.{t}"] = (torch.stack([x.double() for x in c]).mean(0)).to(c[0].dtype)
                    _check_overflow(module, {t: c}, {t: out[f"{module}.{t}"]}, None)
        else:
            raise MismatchError(f"late-phase module {module} has unknown kind {kind!r}; expected batchnorm or linear",
                                tensor=module)
    return out


def _check_overflow(module: str, copies: Mapping[str, Sequence[Tensor]], collapsed: Mapping[str, Tensor],
                    eps: float | None) -> None:
    """Finite copies whose collapse is not finite overflowed the dtype: always an error, as for soups."""
    if not all(bool(torch.isfinite(t).all()) for group in copies.values() for t in group if t.is_floating_point()):
        return  # already warned about (or refused): the non-finite values are the copies' own
    if eps is not None and any(bool((v.double() + eps <= 0).any()) for v in copies["running_var"]):
        return
    for t, v in collapsed.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{module}.{t}: the collapse overflowed {str(v.dtype).removeprefix('torch.')} "
                                 "although every copy is finite (a BatchNorm scale gamma / sqrt(var + eps) beyond "
                                 "the dtype's range); the checkpoint cannot be collapsed in its dtype",
                                 tensor=f"{module}.{t}")


def collapse_checkpoint(path: str | os.PathLike, *, out: str | os.PathLike, force: bool = False,
                        strict: bool = False) -> Path:
    """Write the plain model of a late-phase checkpoint (``papa-merge collapse``).

    The output keeps the checkpoint's ``papa_merge.model`` and ``papa_merge.data`` (so it evaluates like
    any member), marks its ``papa_merge.train`` as collapsed, keeps its metrics (the collapse is the same
    function the late-phase model computes in eval mode) and records the collapse in ``papa_merge.recipe``.

    Args:
        path: a late-phase checkpoint written by method ``late-phase`` (``OUT/late-phase/member-NN.safetensors``).
        out: the ``.safetensors`` file to write.
        force: replace an existing ``out``.
        strict: refuse a copy holding NaN/infinity or a negative running variance (default: a
            :class:`NonFiniteWarning` naming it; the collapsed model is NaN there).

    Returns:
        The path written.

    Raises:
        MissingMetadataError: ``path`` is not a late-phase checkpoint.
        CheckpointFormatError: its late-phase metadata holds an impossible value (named).
        MismatchError: copies missing or inconsistent.
        NonFiniteError: ``strict`` and a copy is not finite; or the collapse overflowed.
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
    plain = collapse_state_dict(tensors, info, strict=strict, path=path)
    train = json.loads(meta[TRAIN_KEY])
    train["late_phase"] = {**info, "collapsed": True}
    meta[TRAIN_KEY] = json.dumps(train, sort_keys=True)
    meta[RECIPE_KEY] = json.dumps({"tool": "papa-merge", "version": version(), "method": "late-phase-collapse",
                                   "citation": CITATION, "members": [fingerprint], "copies": int(info["copies"]),
                                   "modules": sorted(info["modules"])}, sort_keys=True)
    meta.pop("format", None)
    return write_state_dict(plain, out, metadata=meta, force=force)
