"""Merges that use data: RegMean, Fisher merging and AdaMerging, run on a few batches of the members' data.

Each member's model is rebuilt from its checkpoint's metadata (or the architecture given), its data
resolved as ``papa-merge eval`` resolves it, and the model run on a few fixed batches, one member at a
time: :mod:`merge.datamerge.hooks` gathers each linear layer's input Gram matrix (forward hooks) or the
diagonal Fisher of the member's own predictions; :mod:`merge.datamerge.adamerging` learns AdaMerging's
coefficients by entropy minimisation. The merge is then streamed one tensor at a time by the engine
(the operators ``regmean``, ``fisher`` and ``adamerging`` of :mod:`merge.ops.data`).

Example:
    >>> from merge.datamerge import merge_with_data
    >>> merge_with_data(["a.safetensors", "b.safetensors"], out="regmean.safetensors", method="regmean",
    ...                 batches=8)  # doctest: +SKIP
"""

from __future__ import annotations

from merge.datamerge.adamerging import Coefficients, Task, learn_coefficients, softmax_entropy
from merge.datamerge.hooks import fisher_diagonal, functional_logits, input_grams, regmean_layers
from merge.datamerge.members import DEFAULT_BATCHES, MemberData, resolve_members
from merge.datamerge.run import DATA_METHODS, merge_with_data, needs_data

__all__ = ["merge_with_data", "needs_data", "DATA_METHODS", "DEFAULT_BATCHES", "input_grams", "fisher_diagonal",
           "regmean_layers", "functional_logits", "learn_coefficients", "softmax_entropy", "Task", "Coefficients",
           "MemberData", "resolve_members"]
