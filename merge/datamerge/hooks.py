"""A member's model run on a few batches: its linear layers' input Gram matrices and its diagonal Fisher.

Both run one member at a time on a model already holding that member's weights (in eval mode, no
dropout; BatchNorm uses its running statistics), and return what the merge of one tensor needs, keyed
by the tensor's name in the state dict:

- :func:`input_grams` (RegMean): a forward hook on every linear layer accumulates the mean of
  ``x x^T`` over the rows of its input (every position of a sequence, as the reference does), in
  float64;
- :func:`fisher_diagonal` (Fisher merging): the exact expected Fisher of the model's own predictive
  distribution, ``mean_x sum_y p(y|x) (d log p(y|x) / d theta)^2``, one example at a time, as
  ``mmatena/model_merging`` computes it (``expectation_wrt_logits``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from merge.models import forward_logits, to_device

__all__ = ["regmean_layers", "input_grams", "fisher_diagonal", "functional_logits", "batch_size_of"]

Forward = Callable[[nn.Module, Any], Tensor]
# Elements of per-example gradients the vectorised Fisher holds at once (float32: 256 MiB).
_VMAP_ELEMENTS = 1 << 26


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer whose weight is stored [in, out]; matched by name so that
    # transformers is not imported for models that do not use it.
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def regmean_layers(model: nn.Module) -> dict[str, bool]:
    """The layers RegMean merges: ``{module name: weight stored [in, out]}``.

    ``nn.Linear`` (``[out, in]``) and transformers' ``Conv1D`` (``[in, out]``), as the reference hooks
    them. Convolutions (``nn.Conv1d``/``nn.Conv2d``), embeddings and normalisation layers are averaged:
    the reference does not hook ``nn.Conv2d``; it hooks ``nn.Conv1d`` but reshapes its ``[B, C, L]``
    input as if ``L`` were the features, so papa-merge averages ``nn.Conv1d`` too.
    """
    return {name: _is_hf_conv1d(m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or _is_hf_conv1d(m)}


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


@torch.no_grad()
def input_grams(model: nn.Module, batches: Iterable[Any], *, device: torch.device | str = "cpu",
                forward: Forward = forward_logits) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Each linear layer's input Gram matrix over ``batches``: ``{weight name: mean of x x^T}`` (float64, CPU).

    Args:
        model: the member's model (its weights loaded), moved to ``device``.
        batches: model inputs (a tensor, or a dict of tensors for text models); labels are not used.
        device: where the model runs.
        forward: ``forward(model, inputs) -> logits``.

    Returns:
        ``(grams, rows)``: per weight tensor name, the mean of ``x x^T`` over the ``rows`` input rows seen.
        A layer the batches never reach is absent.
    """
    layers = regmean_layers(model)
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def add(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            xtx = (x.T @ x).cpu()
            sums[name] = sums[name] + xtx if name in sums else xtx
            rows[name] = rows.get(name, 0) + x.shape[0]
        return add

    modules = dict(model.named_modules())
    for name in layers:
        handles.append(modules[name].register_forward_hook(hook(name + ".weight" if name else "weight")))
    was_training = model.training
    model.eval()
    try:
        for inputs in batches:
            forward(model, to_device(inputs, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v / rows[k] for k, v in sums.items()}, rows


def fisher_diagonal(model: nn.Module, batches: Iterable[Any], *, device: torch.device | str = "cpu",
                    forward: Forward = forward_logits) -> tuple[dict[str, Tensor], int]:
    """The diagonal of the expected Fisher of the model's predictive distribution, per parameter (float32, CPU).

    ``F = (1/N) sum_x sum_y p(y|x) (d log p(y|x) / d theta)^2`` over the ``N`` examples of ``batches``,
    the expectation over the model's own predicted classes taken in full (no sampling), as the
    reference. Per-example gradients are vectorised (``torch.func``) where the model allows it, else
    taken one example at a time.

    Returns:
        ``(fisher, examples)``: ``{parameter name: F}`` for every parameter, and ``N``.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    was_training = model.training
    model.eval()
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    n = 0
    try:
        for inputs in batches:
            inputs = to_device(inputs, device)
            b = batch_size_of(inputs)
            try:
                batch = _fisher_vmap(model, params, inputs, forward)
            except Exception:  # noqa: BLE001 - a model torch.func cannot vectorise: one example at a time
                batch = _fisher_loop(model, params, inputs, forward)
            for k, v in batch.items():
                total[k] += v.float()
            n += b
    finally:
        model.train(was_training)
    return {k: (v / max(n, 1)).cpu() for k, v in total.items()}, n


def _one(inputs: Any, i: int) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v[i:i + 1] for k, v in inputs.items()}
    return inputs[i:i + 1]


def _fisher_loop(model: nn.Module, params: dict[str, Tensor], inputs: Any, forward: Forward) -> dict[str, Tensor]:
    """Sum over the batch's examples of ``sum_y p(y|x) g_y^2``, one example and one class at a time."""
    names = list(params)
    live = [p for _, p in model.named_parameters()]
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(batch_size_of(inputs)):
        with torch.enable_grad():
            logp = torch.log_softmax(forward(model, _one(inputs, i)).float(), dim=-1)[0]
            probs = logp.detach().exp()
            for c in range(logp.shape[0]):
                grads = torch.autograd.grad(logp[c], live, retain_graph=c + 1 < logp.shape[0], allow_unused=True)
                for k, g in zip(names, grads):
                    if g is not None:
                        out[k] += probs[c] * g.detach() ** 2
    return out


def _fisher_vmap(model: nn.Module, params: dict[str, Tensor], inputs: Any, forward: Forward) -> dict[str, Tensor]:
    """:func:`_fisher_loop`, with per-example gradients vectorised by ``torch.func`` in chunks of examples."""
    from torch.func import grad, vmap

    buffers = dict(model.named_buffers())
    numel = sum(p.numel() for p in params.values())
    b = batch_size_of(inputs)
    chunk = max(1, min(b, _VMAP_ELEMENTS // max(numel, 1)))

    def log_probs(p: dict[str, Tensor], x: Any) -> Tensor:
        x1 = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, Mapping) else x.unsqueeze(0)
        return torch.log_softmax(functional_logits(model, {**buffers, **p}, x1, forward).float(), dim=-1)[0]

    def class_log_prob(p: dict[str, Tensor], x: Any, c: Tensor) -> Tensor:
        return log_probs(p, x)[c]

    out = {k: torch.zeros_like(v) for k, v in params.items()}
    per_example = vmap(grad(class_log_prob), in_dims=(None, 0, None))
    with torch.no_grad():
        probs = torch.softmax(forward(model, inputs).float(), dim=-1)
    for s in range(0, b, chunk):
        x = {k: v[s:s + chunk] for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs[s:s + chunk]
        for c in range(probs.shape[1]):
            g = per_example(params, x, torch.tensor(c, device=probs.device))
            w = probs[s:s + chunk, c]
            for k, v in g.items():
                out[k] += torch.einsum("b,b...->...", w, v.detach() ** 2)
    return out


class _Swapped:
    """Calls ``model`` with ``tensors`` in place of its parameters and buffers (``torch.func.functional_call``)."""

    def __init__(self, model: nn.Module, tensors: Mapping[str, Tensor]):
        self.model, self.tensors = model, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.model, dict(self.tensors), args, kwargs, strict=False)


def functional_logits(model: nn.Module, tensors: Mapping[str, Tensor], inputs: Any,
                      forward: Forward = forward_logits) -> Tensor:
    """``forward(model, inputs)`` computed with ``tensors`` (name -> tensor, differentiable) in place of the model's
    own parameters and buffers of those names; the model itself is left untouched."""
    return forward(_Swapped(model, tensors), inputs)  # type: ignore[arg-type]
