"""Tokenizer merging for mergekit recipes: the output vocabulary, and each member's embedding and head rows on it.

A recipe's ``tokenizer_source: base | union | <model>`` or ``tokenizer:`` block (``source``, ``tokens``,
``pad_to_multiple_of``) is read as mergekit 0.1.5 reads it (``mergekit/tokenizer/build.py``, ``embed.py``,
``config.py``; ``mergekit/merge.py`` for what is written):

- the output tokenizer is the base model's (tokens at ids past its ``config.json`` ``vocab_size`` stripped, BPE
  only), a named model's (as it is), or the union: the base's, then every token of the other models it lacks,
  in the order met (their added tokens with their settings); a ``tokens:`` entry naming a token it lacks is
  added to it;
- each model's vocabulary tensors (``embed_tokens``, ``lm_head``, ``wte``, ... : :data:`VOCAB_SUFFIXES`) are
  presented with one row per output token: the model's own row where it has the token; else, for a token some
  inputs of that tensor lack, mergekit's default: the only model that has it, else the base's row if the base has
  it, else the mean of the rows of the models that have it, and zeros when none has it. A ``tokens:`` entry sets
  that default instead (``source: MODEL`` that model's row; ``{kind: model_token, model, token_id | token}`` a
  given row of a model; ``{kind: zero}``), and with ``force: true`` replaces the row in every model;
- ``pad_to_multiple_of`` rounds the row count up; each padding row is the mean of that model's other rows;
- ``chat_template`` is a named template (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``: mergekit's
  bundled ones), ``auto`` (the template most of the models' tokenizers carry), or a literal Jinja string; it is
  set on the output tokenizer, which ``save_pretrained`` writes (``chat_template.jinja`` with transformers 5);
- the output folder holds the tokenizer ``save_pretrained`` writes (the base's carried tokenizer files are
  replaced), and ``config.json`` gets ``vocab_size`` = the row count.

Nothing holds a model: :class:`VocabSource` wraps a member's :class:`~merge.io.sources.Source` and builds the
requested rows of a vocabulary tensor on each read (its own rows read in runs, a default row from the one to a few
rows it mixes), so a chunk costs a chunk-sized block; a padding row's mean is one pass over the tensor, kept as one
row.

Deliberate differences from mergekit 0.1.5 (also in :data:`DIFFERENCES`) are listed there.

Example:
    >>> chat_template_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merge.backend.lazy import lazy_torch
from merge.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError, MergeWarning
from merge.io.sources import Source, TensorInfo, read_row_blocks

torch = lazy_torch(__name__)  # a recipe without a tokenizer never needs it

__all__ = ["TokenSource", "TokenizerSpec", "VocabPlan", "VocabGroup", "VocabSource", "build_vocab",
           "chat_template_text", "write_tokenizer", "load_tokenizer", "is_vocab_tensor", "MERGEKIT_TEMPLATE_NAMES",
           "VOCAB_SUFFIXES", "TOKENIZER_FILES", "DIFFERENCES", "TokenizerWarning"]

# The tensors mergekit's architectures mark with a ``vocabulary_axis`` (always 0): names ending so.
VOCAB_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                  "embed_in.weight", "embed_out.weight", "lm_head.weight", "lm_head.bias", "lm_head.linear.weight",
                  "lm_head.linear.bias", "lm_head.decoder.weight", "output.weight", "output_layer.weight",
                  "vocab_projector.weight", "vocab_projector.bias", "shared.weight", "backbone.embeddings.weight",
                  "cls.predictions.bias")
# Files of a model folder that hold a tokenizer: replaced by the merged tokenizer's own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
_BLOCK_ELEMS = 1 << 18  # elements per block of rows built at a time

# The names of mergekit 0.1.5's bundled chat templates (mergekit/_data/chat_templates/*.jinja). Their texts are
# mergekit's files and are not shipped here: a recipe naming one is refused with the fix (the text itself, or auto).
MERGEKIT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")

# What papa-merge does on purpose otherwise than mergekit 0.1.5.
DIFFERENCES = (
    "the union adds each model's new tokens in the order of their ids; mergekit adds them in the order of "
    "get_vocab(), a hash map's, which changes from process to process (and so do the new tokens' ids)",
    "models are taken in the recipe's order (the union's new tokens, 'auto' chat template ties, the base-less "
    "tokenizer source); mergekit takes them from a set, whose order changes from run to run",
    "default and padding rows are computed in float64 and rounded once to each model's stored dtype; mergekit "
    "computes them in the promoted dtype of the inputs (bfloat16 with dtype: bfloat16)",
    "a token at an id past a model's vocab_size counts as missing from it; mergekit fails on such a token (KeyError)",
    "a tokens: entry without a source for a token some model lacks is refused by name; mergekit fails "
    "(NotImplementedError)",
    "tokenizer_source: base when the base has no tokenizer files merges the rows as they are (as before); mergekit "
    "fails",
    "chat_template names one of mergekit's bundled templates (alpaca, chatml, exaone, llama3, mistral): refused, as "
    "their texts are mergekit's files; the template's own Jinja text (or auto) is taken",
)


class TokenizerWarning(MergeWarning):
    """A model's tokenizer does not load, or a token is in no model; the merge goes on as mergekit's does."""


@dataclass(frozen=True)
class TokenSource:
    """One ``tokens:`` entry of a ``tokenizer:`` block (mergekit's ``TokenEmbeddingConfig``).

    ``kind`` is ``model`` (the token's row in ``model``), ``model_token`` (row ``token_id``, or the row of
    ``token`` in ``model``'s own vocabulary), ``zero``, or ``None`` (no source: the token is only added).
    """

    kind: str | None = None
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass
class TokenizerSpec:
    """What a recipe asks of the output tokenizer: its source, per-token sources, padding, chat template."""

    source: str | None  # "base", "union", a model reference, or None (chat_template alone)
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    base: str | None = None  # the recipe's base_model, whatever the method does with it

    @property
    def merges(self) -> bool:
        """Whether the vocabulary tensors are rebuilt (a tokenizer source), not only the template set."""
        return self.source is not None


def is_vocab_tensor(name: str, info: TensorInfo) -> bool:
    """Whether ``name`` is a vocabulary-indexed tensor (rows = tokens), by its name as mergekit's architectures list.

    Example:
        >>> is_vocab_tensor("model.embed_tokens.weight", TensorInfo("x", torch.float32, (32, 8)))
        True
    """
    return len(info.shape) >= 1 and any(name == s or name.endswith("." + s) for s in VOCAB_SUFFIXES)


# --- the output tokenizer -----------------------------------------------------------------------------------


def _config_vocab_size(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    value = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_tokenizer(folder: Path, **kwargs: object) -> Any:
    """A model folder's tokenizer (``AutoTokenizer``), from its own files only: never a download.

    Raises:
        CheckpointNotFoundError: ``folder`` is not a folder (a single-file checkpoint has no tokenizer).
    """
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise CheckpointNotFoundError(f"{folder}: not a model folder, so it has no tokenizer files", path=folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)


def _stripped_tokenizer(folder: Path) -> Any:
    """The base's tokenizer without the tokens at ids past its ``vocab_size`` (mergekit's
    ``get_stripped_tokenizer``; BPE only)."""
    import tokenizers

    tok = load_tokenizer(folder, use_fast=True)
    size = _config_vocab_size(folder) or len(tok.get_vocab())
    unused = [t for t, i in tok.get_vocab().items() if i >= size]
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())  # the tokenizers backend's JSON, as mergekit edits it
    if data["model"]["type"] != "BPE":
        raise CheckpointFormatError(f"{folder}: its tokenizer holds tokens past vocab_size {size} and is "
                                    f"{data['model']['type']}, not BPE; mergekit strips only BPE tokenizers: pass "
                                    "a base whose tokenizer fits its embeddings", path=folder)
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    drop = set(unused)

    def keep(m: object) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)  # type: ignore[arg-type]
        return not any(p in drop for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union_tokenizer(base_tok: Any, toks: Mapping[str, Any], sizes: Mapping[str, int | None]) -> Any:
    """mergekit's ``build_union_tokenizer``: the base's tokenizer plus every other model's tokens, in order."""
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for ref, tok in toks.items():
        size = sizes.get(ref) or tok.vocab_size
        # In id order: get_vocab() comes from a Rust hash map whose order changes from process to process, which
        # makes mergekit's ids of the new tokens change from run to run.
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            # mergekit's "if tok in added_tokens" compares a string with integer ids: added tokens land here too
            if i < size and t not in out_vocab:
                out_vocab[t] = len(out_vocab)
        for i, info in tok.added_tokens_decoder.items():
            if i < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a fresh copy, so the base's stays as it is
        base_tok.save_pretrained(d)
        res = load_tokenizer(Path(d), use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@dataclass
class VocabPlan:
    """The output tokenizer and, per model reference, where each output token's row is in that model.

    ``perms[ref][i]`` is the model's row of output token ``i`` (``-1``: the model lacks it); ``rows`` the output's
    row count (the vocabulary, padded to ``pad_to_multiple_of``).
    """

    tokenizer: Any
    vocab: dict[str, int]
    perms: dict[str, np.ndarray]
    original: dict[str, dict[str, int]]
    tokens: dict[str, TokenSource]
    rows: int
    base: str | None

    @property
    def size(self) -> int:
        return len(self.vocab)

    def identity(self, ref: str, rows: int) -> bool:
        """Whether ``ref``'s rows are the output's as they are (same tokens, same ids, same count, no forced token)."""
        p = self.perms[ref]
        return (rows == self.rows == self.size and bool((p == np.arange(self.size)).all())
                and not any(c.force for c in self.tokens.values()))


def build_vocab(spec: TokenizerSpec, models: Sequence[str], folders: Mapping[str, Path]) -> VocabPlan:
    """The output tokenizer of ``spec`` and every model's permutation onto it (mergekit's ``build_tokenizer``).

    Args:
        spec: the recipe's tokenizer settings (``spec.source`` set).
        models: every model reference of the recipe, in the recipe's order.
        folders: each reference's model folder (where its tokenizer and ``config.json`` are).

    Raises:
        CheckpointNotFoundError: the base (or the named source) has no tokenizer that loads.
        CheckpointFormatError: a base tokenizer past its vocab_size that is not BPE; a vocabulary with holes.
    """
    base = spec.base or models[0]
    sizes = {ref: _config_vocab_size(folders[ref]) for ref in models}

    def load(ref: str, stripped: bool = False) -> Any:
        try:
            return _stripped_tokenizer(folders[ref]) if stripped else load_tokenizer(folders[ref])
        except CheckpointFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for these
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointNotFoundError(f"{folders[ref]}: its tokenizer does not load ({first}); the recipe's "
                                          "tokenizer needs the model folder's tokenizer files",
                                          path=folders[ref]) from None

    toks = {base: load(base, stripped=True)}
    for ref in models:
        if ref in toks:
            continue
        try:
            toks[ref] = load(ref)
        except CheckpointNotFoundError as e:
            warnings.warn(TokenizerWarning(f"{e}; its tokens are taken to be the base's, as mergekit does"),
                          stacklevel=2)
    if spec.source == "base":
        out = toks[base]
    elif spec.source == "union":
        out = _union_tokenizer(toks[base], toks, sizes)
    else:
        out = load(spec.source)
    known = set(out.get_vocab())
    for t in spec.tokens:
        if t not in known:
            out.add_tokens(t)
            known.add(t)
    vocab = out.get_vocab()
    if vocab and max(vocab.values()) != len(vocab) - 1:
        raise CheckpointFormatError(f"the output tokenizer's ids are not 0..{len(vocab) - 1} (largest "
                                    f"{max(vocab.values())}); a merged vocabulary needs consecutive ids")
    perms = {}
    for ref in models:
        own = toks.get(ref, toks[base]).get_vocab()
        size = sizes[ref] or len(own)
        p = np.full(len(vocab), -1, dtype=np.int64)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < size:
                p[i] = j
        perms[ref] = p
    rows = len(vocab)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    return VocabPlan(out, vocab, perms, {ref: t.get_vocab() for ref, t in toks.items()}, dict(spec.tokens), rows,
                     spec.base)


# --- rows of one tensor ---------------------------------------------------------------------------------------


@dataclass
class _Rules:
    """Rows of one vocabulary tensor over its inputs: each model's own rows, and the rows built for the others.

    ``own[ref][i]``: the model's row for output row ``i`` (``-1``: built); ``mixed[i]``: the ``(model, row)`` pairs
    whose mean is row ``i`` where a model has no own row (empty: zeros).
    """

    own: dict[str, np.ndarray]
    mixed: dict[int, list[tuple[str, int]]]


def _mix_for(plan: VocabPlan, token: str, tid: int, cfg: TokenSource, models: Sequence[str], tensor: str,
             rows_of: Mapping[str, int]) -> list[tuple[str, int]]:
    """The rows a ``tokens:`` entry takes (mergekit's ``compute_default_embedding``)."""
    if cfg.kind == "zero":
        return []
    if cfg.kind is None:
        raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: the token is missing from a model's {tensor} (or "
                                   "forced) and the entry has no source; give it 'source: MODEL', "
                                   "'{kind: model_token, ...}' or '{kind: zero}'", option="tokenizer")
    model = cfg.model
    if model not in models:
        raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: takes its row from {model}, which is not an input of "
                                   f"{tensor} ({', '.join(models)}); name one of them", option="tokenizer")
    if cfg.kind == "model_token":
        row = cfg.token_id
        if row is None:
            vocab = plan.original.get(model)
            if vocab is None or cfg.token not in vocab:
                raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: token {cfg.token!r} is not in {model}'s "
                                           "tokenizer", option="tokenizer")
            row = vocab[cfg.token]
        if not 0 <= row < rows_of[model]:
            raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: token_id {row} is out of range of {model}'s "
                                       f"{tensor} ({rows_of[model]} rows)", option="tokenizer")
        return [(model, int(row))]
    row = int(plan.perms[model][tid])
    if row < 0:
        raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: {model} does not have this token; take its row "
                                   "from a model that has it ('source: MODEL') or give '{kind: zero}'",
                                   option="tokenizer")
    return [(model, row)]


def tensor_rules(plan: VocabPlan, models: Sequence[str], base: str | None, tensor: str,
                 rows_of: Mapping[str, int]) -> _Rules:
    """Each input's rows of one vocabulary tensor (mergekit's ``PermutedVocabulary.execute``).

    Args:
        plan: the output vocabulary.
        models: the inputs of this tensor's merge, in order (mergekit's ``tensors``).
        base: the recipe's base model (its row is the default when it has the token).
        tensor: the tensor's name (for messages).
        rows_of: each input's row count of this tensor.
    """
    models = list(dict.fromkeys(models))
    present = np.stack([plan.perms[m] >= 0 for m in models])  # (models, vocab)
    counts = present.sum(axis=0)
    mixed: dict[int, list[tuple[str, int]]] = {}
    forced = []
    nowhere = []
    for token, tid in plan.vocab.items():
        cfg = plan.tokens.get(token)
        if cfg is not None and cfg.force:
            forced.append(tid)
        elif counts[tid] == len(models):
            continue
        if cfg is not None:
            mixed[tid] = _mix_for(plan, token, tid, cfg, models, tensor, rows_of)
            continue
        has = [m for m in models if plan.perms[m][tid] >= 0]
        if len(has) == 1:
            mixed[tid] = [(has[0], int(plan.perms[has[0]][tid]))]
        elif not has:
            nowhere.append(token)
            mixed[tid] = []
        elif base in models and plan.perms[base][tid] >= 0:
            mixed[tid] = [(base, int(plan.perms[base][tid]))]
        else:
            mixed[tid] = [(m, int(plan.perms[m][tid])) for m in has]
    if nowhere:
        shown = ", ".join(repr(t) for t in sorted(nowhere)[:5]) + (", ..." if len(nowhere) > 5 else "")
        warnings.warn(TokenizerWarning(f"{len(nowhere)} token{'s' * (len(nowhere) != 1)} of the output vocabulary "
                                       f"({shown}) in none of the inputs of {tensor} ({', '.join(models)}): their "
                                       "rows are zeros, as mergekit's"), stacklevel=3)
    own = {}
    for m in models:
        p = plan.perms[m].copy()
        p[forced] = -1
        if (p >= rows_of[m]).any():
            raise CheckpointFormatError(f"{m}: its {tensor} has {rows_of[m]} rows but its tokenizer gives ids up to "
                                        f"{int(p.max())}; its config's vocab_size does not fit its weights",
                                        tensor=tensor)
        own[m] = p
    return _Rules(own, mixed)


class VocabGroup:
    """The inputs of a recipe whose vocabulary tensors are rebuilt: the plan, each model's source, and which
    models are the inputs of a vocabulary tensor.

    Args:
        plan: the output vocabulary.
        raw: each model reference's source, unwrapped.
        inputs: ``tensor name -> (models, base)``: the inputs of that tensor's merge, and the base model.
    """

    def __init__(self, plan: VocabPlan, raw: Mapping[str, Source],
                 inputs: Callable[[str], tuple[Sequence[str], str | None]]):
        self.plan = plan
        self.raw = dict(raw)
        self._inputs = inputs
        self._rules: dict[tuple, _Rules] = {}

    def rules(self, tensor: str) -> _Rules:
        models, base = self._inputs(tensor)
        key = (tensor, tuple(models), base)
        if key not in self._rules:
            rows_of = {}
            for m in models:
                info = self.raw[m].infos.get(tensor)
                if info is None:
                    raise CheckpointFormatError(f"{m}: has no {tensor}, which the merged vocabulary needs from every "
                                                "input", tensor=tensor)
                rows_of[m] = info.shape[0]
            self._rules[key] = tensor_rules(self.plan, models, base, tensor, rows_of)
        return self._rules[key]

    def wrap(self, ref: str) -> Source:
        """``ref``'s source with its vocabulary tensors on the output vocabulary (itself when nothing changes)."""
        src = self.raw[ref]
        vocab = [n for n, i in src.infos.items() if is_vocab_tensor(n, i)]
        for n in vocab:
            if ref in self._inputs(n)[0]:
                self.rules(n)  # every row's source checked now, before the merge reads anything
        if all(self.plan.identity(ref, src.infos[n].shape[0]) for n in vocab):
            return src
        return VocabSource(src, ref, self, vocab)


class VocabSource(Source):
    """A member's source with its vocabulary tensors presented on the output vocabulary, built per read.

    Args:
        source: the model's source.
        ref: its reference in the recipe (its key in the group's plan).
        group: the :class:`VocabGroup` (the other inputs' rows, for the rows this model lacks).
        names: its vocabulary tensors.

    Example:
        >>> src = VocabSource(raw, "m0", group, ["model.embed_tokens.weight"])  # doctest: +SKIP
        >>> src.read("model.embed_tokens.weight").shape[0] == group.plan.rows  # doctest: +SKIP
        True
    """

    kind = "vocab"

    def __init__(self, source: Source, ref: str, group: VocabGroup, names: Sequence[str]):
        self._src = source
        self._ref = ref
        self._group = group
        self.path = source.path
        self.metadata = dict(source.metadata)
        self.infos = dict(source.infos)
        self._vocab = set(names)
        for n in names:
            info = source.infos[n]
            self.infos[n] = TensorInfo(n, info.dtype, (group.plan.rows, *info.shape[1:]))
        self._means: dict[str, torch.Tensor] = {}

    def _row(self, ref: str, tensor: str, row: int) -> torch.Tensor:
        src = self._group.raw[ref]
        info = src.infos[tensor]
        t = torch.empty(info.shape[1:], dtype=info.dtype)
        if t.numel():
            src.read_into(tensor, row * t.numel() * info.dtype.itemsize, memoryview(t.reshape(-1).view(torch.uint8)
                                                                                 .numpy()))
        return t

    def _rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Output rows ``[r0, r1)`` of vocabulary tensor ``name``, in its stored dtype."""
        info = self.infos[name]
        out = torch.empty((r1 - r0, *info.shape[1:]), dtype=info.dtype)
        rules = self._group.rules(name)
        own = rules.own[self._ref]
        size = self._group.plan.size
        row_elems = out[0].numel() if r1 > r0 else 0
        seg = own[r0:min(r1, size)]
        # Runs: the model's own consecutive rows (one read each), and each built row alone.
        starts = np.ones(len(seg), dtype=bool)
        starts[1:] = (seg[1:] != seg[:-1] + 1) | (seg[:-1] < 0)
        firsts = np.flatnonzero(starts)
        for a, b in zip(firsts.tolist(), [*firsts[1:].tolist(), len(seg)]):
            if seg[a] >= 0:
                if row_elems:
                    block = out[a:b].reshape(-1).view(torch.uint8)
                    self._src.read_into(name, int(seg[a]) * row_elems * info.dtype.itemsize, memoryview(block.numpy()))
                continue
            parts = rules.mixed.get(r0 + a, [])
            acc = torch.zeros(info.shape[1:], dtype=torch.float64)
            for ref, row in parts:
                acc += self._row(ref, name, row).to(torch.float64)
            out[a] = (acc / len(parts) if parts else acc).to(info.dtype)
        if r1 > size:  # padding rows: the mean of this model's rows over the vocabulary
            out[max(r0, size) - r0:] = self._mean(name).to(info.dtype)
        return out

    def _mean(self, name: str) -> torch.Tensor:
        if name not in self._means:
            info = self.infos[name]
            size = self._group.plan.size
            step = max(1, _BLOCK_ELEMS // max(1, int(np.prod(info.shape[1:], dtype=np.int64))))
            total = torch.zeros(info.shape[1:], dtype=torch.float64)
            for r in range(0, size, step):
                total += self._rows(name, r, min(size, r + step)).to(torch.float64).sum(dim=0)
            self._means[name] = total / size
        return self._means[name]

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        if name not in self._vocab:
            self._src.read_into(name, byte_offset, out)
            return
        info = self.infos[name]
        row_bytes = int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize
        step = max(1, _BLOCK_ELEMS * info.dtype.itemsize // max(1, row_bytes))
        read_row_blocks(out, byte_offset, row_bytes, step,
                        lambda r, r1: memoryview(self._rows(name, r, r1).reshape(-1).view(torch.uint8).numpy()))

    @property
    def files(self) -> list[Path]:
        return self._src.files

    def fingerprint(self) -> dict[str, object]:
        return self._src.fingerprint()

    def close(self) -> None:
        self._means.clear()

    def __repr__(self) -> str:
        return f"VocabSource({self._src!r}, {self._group.plan.rows} rows)"


# --- chat template and output files -------------------------------------------------------------------------


def chat_template_text(value: str, folders: Sequence[Path] = ()) -> str | None:
    """The Jinja text of a recipe's ``chat_template`` (mergekit's ``_set_chat_template``).

    ``auto``: the template most of the models' tokenizers carry (``None`` if none has one); a name of
    else a literal template (at least 20 characters, with ``{``). mergekit's template names
    (:data:`MERGEKIT_TEMPLATE_NAMES`) are refused: their texts are mergekit's files, not shipped here.

    Raises:
        InvalidArgumentError: neither a known name nor a template.
    """
    if value == "auto":
        found = []
        for folder in folders:
            try:
                template = load_tokenizer(folder).chat_template
            except Exception:  # noqa: BLE001 - a model without a tokenizer has no vote, as in mergekit
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if value in MERGEKIT_TEMPLATE_NAMES:
        raise InvalidArgumentError(f"chat_template {value!r} names one of mergekit's bundled templates, which "
                                   "papa-merge does not ship (their text is mergekit's); put the template's Jinja text "
                                   "in the recipe, or use auto", option="chat_template")
    if len(value) < 20 or "{" not in value:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidArgumentError(f"chat_template {shown!r} is neither auto nor a Jinja template; put the template's "
                                   "text in the recipe", option="chat_template", choices=("auto",))
    return value


def write_tokenizer(out: Path, tokenizer: Any, *, rows: int | None, chat_template: str | None) -> list[Path]:
    """Put ``tokenizer`` (with ``chat_template`` set) into model folder ``out``, replacing the tokenizer files carried
    there, and set ``config.json``'s ``vocab_size`` to ``rows`` (``None``: left as it is).

    The files are written into a temporary folder inside ``out`` first and renamed into place one by one.

    Returns:
        The files written.
    """
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))
    try:
        tokenizer.save_pretrained(str(tmp))
        written = sorted(f.name for f in tmp.iterdir() if f.is_file())
        if rows is not None and (out / "config.json").is_file():
            config = json.loads((out / "config.json").read_text(encoding="utf-8"))
            if isinstance(config, dict):
                config["vocab_size"] = rows
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                written.append("config.json")
        for name in TOKENIZER_FILES:
            if name not in written and (out / name).is_file():
                os.remove(out / name)
        for name in written:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in written]
