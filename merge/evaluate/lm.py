"""Causal language models as members: held-out perplexity on a text file.

A member is a Hugging Face model folder (``config.json`` whose ``architectures`` names a ``*ForCausalLM``,
the weights, and the tokenizer files), local or ``hf://org/name``. Its score is the perplexity of a
held-out text, token-weighted as language-model evaluation reports it::

    NLL = (sum over every predicted token t of -log p(t | the tokens before it in its block)) / (tokens predicted)
    perplexity = exp(NLL)

How the text becomes tokens (:func:`token_blocks`), as Hugging Face's ``run_clm.py`` builds its evaluation
set: every document is tokenised with the members' tokenizer (no special tokens), followed by the
tokenizer's end-of-text token (``eos``, else ``sep``, so the end of each document is predicted too), the
documents are concatenated and cut into blocks of ``block_size`` tokens. Concatenation, not one block
per document, so that short documents (tweets, headlines) are not padded out and every block carries a
full context, and the score does not depend on how the file is split into documents. Unlike
``run_clm.py``, the last, shorter block is kept, so every token of the file except the first of each
block is scored. The first token of a block has no context and is not predicted.

Scores are computed in float32 logits with float64 sums; soups are scored as the model they would
be written as (the candidate state dict loaded into one model built from the first member's config).

Example:
    >>> ev = LanguageModelEvaluator.from_members(["ft-a/", "ft-b/"], eval_text="val.jsonl")  # doctest: +SKIP
    >>> ev.perplexity_of(ev.state_dict_of("ft-a/")).perplexity  # doctest: +SKIP
    41.7
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge.engine import resolve_device
from merge.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError, MismatchError
from merge.evaluate.inference import StateDictScore, load_into
from merge.io.schemes import resolve
from merge.io.sources import open_checkpoint

__all__ = ["CAUSAL_LM_SUFFIX", "TEXT_SPLIT", "causal_lm_architecture", "is_causal_lm", "read_eval_texts",
           "token_blocks", "Perplexity", "token_logprobs", "mixture_logprobs", "LanguageModelEvaluator"]

CAUSAL_LM_SUFFIX = "ForCausalLM"
TEXT_SPLIT = "text"
"""The name of the one held-out split of a language-model evaluation (the ``--eval-text`` file) in rows."""
TEXT_FIELD = "text"
# Files that hold a tokenizer's vocabulary: one of them must be in a member folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "merges.txt")


def _folder(member: str | os.PathLike) -> Path:
    return Path(resolve(member))


def causal_lm_architecture(member: str | os.PathLike) -> str | None:
    """The ``*ForCausalLM`` architecture a model folder's ``config.json`` names, or None.

    None for anything else: a file, a folder without ``config.json``, or a config of another head
    (``BertForSequenceClassification``). Reads only the config.
    """
    config = _folder(member) / "config.json"
    if not config.is_file():
        return None
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, OSError, AttributeError):
        return None
    return next((a for a in archs if isinstance(a, str) and a.endswith(CAUSAL_LM_SUFFIX)), None)


def is_causal_lm(member: str | os.PathLike) -> bool:
    """Whether ``member`` is a causal language-model folder (:func:`causal_lm_architecture`)."""
    return causal_lm_architecture(member) is not None


def _check_causal_lm(member: str | os.PathLike) -> str:
    arch = causal_lm_architecture(member)
    if arch is not None:
        return arch
    folder = _folder(member)
    if not (folder.exists() or folder.is_symlink()):
        raise CheckpointNotFoundError(f"{member}: no such file or folder", path=member)
    what = "a file" if folder.is_file() else "a folder without config.json"
    if (folder / "config.json").is_file():
        try:
            archs = json.loads((folder / "config.json").read_text()).get("architectures")
        except (ValueError, OSError, AttributeError):
            archs = None
        what = f"a {', '.join(map(str, archs))} model" if archs else "a model whose config.json names no architecture"
    raise InvalidArgumentError(f"{member}: is {what}, not a causal language model (a Hugging Face folder whose "
                               f"config.json architecture is *{CAUSAL_LM_SUFFIX}); perplexity on a text scores "
                               "only those, so evaluate other checkpoints without the text", path=member,
                               option="eval_text")


def read_eval_texts(path: str | os.PathLike, *, field: str = TEXT_FIELD) -> list[str]:
    """The documents of a held-out text file: JSONL with a ``text`` field, or plain text.

    A file whose name ends in ``.jsonl`` (or ``.json``) is read as JSON lines: one object per non-blank line,
    its ``field`` the document. Any other file is plain UTF-8 text, one document (blocks cross line ends
    anyway, see :func:`token_blocks`).

    Raises:
        CheckpointNotFoundError: no such file.
        InvalidArgumentError: the file holds no text, or a JSONL line is not an object with a string ``field``.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointNotFoundError(f"{path}: no such text file", path=path, option="eval_text")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start}); save the held-out "
                                   "text as UTF-8", path=path, option="eval_text") from None
    if p.suffix.lower() in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise InvalidArgumentError(f"{path}: line {n} is not JSON; a .jsonl file holds one JSON object per "
                                           f"line with a {field!r} field", path=path, option="eval_text") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise InvalidArgumentError(f"{path}: line {n} has no string {field!r} field; each line must be an "
                                           f"object like {{\"{field}\": \"...\"}}", path=path, option="eval_text")
            texts.append(obj[field])
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidArgumentError(f"{path}: holds no text to score; give a held-out text (plain text, or JSONL "
                                   f"with a {field!r} field)", path=path, option="eval_text")
    return texts


def _load_tokenizer(member: str | os.PathLike) -> Any:
    _check_tokenizer_files(member)
    folder = _folder(member)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(f"{member}: its tokenizer does not load ({first}); save it again with "
                                    "tokenizer.save_pretrained(folder)", path=member) from None


def _end_token(tokenizer: Any) -> int | None:
    for name in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    return None


def token_blocks(texts: Sequence[str], tokenizer: Any, *, block_size: int) -> list[list[int]]:
    """Documents as blocks of token ids: tokenised, each followed by the end-of-text token, concatenated, cut.

    The end-of-text token is the tokenizer's ``eos`` (else ``sep``; none if it has neither). The last
    block is kept even when shorter, if it has a token to predict (two tokens or more).

    Args:
        texts: the documents.
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        block_size: tokens per block (the context each prediction sees at most).

    Returns:
        The blocks, in text order.

    Raises:
        InvalidArgumentError: ``block_size`` < 2, or the texts hold fewer than two tokens.

    Example:
        >>> class Tok:  # a stand-in: one id per character
        ...     eos_token_id = 0
        ...     def __call__(self, texts, add_special_tokens, verbose):
        ...         return {"input_ids": [[ord(c) for c in t] for t in texts]}
        >>> token_blocks(["ab", "c"], Tok(), block_size=2)
        [[97, 98], [0, 99]]
    """
    if block_size < 2:
        raise InvalidArgumentError(f"block_size must be at least 2 (a context token and a token to predict), got "
                                   f"{block_size}", option="block_size")
    end = _end_token(tokenizer)
    ids: list[int] = []
    # verbose=False: documents longer than the tokenizer's model_max_length are expected; blocks cut them.
    for doc in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(int(t) for t in doc)
        if end is not None:
            ids.append(end)
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
    if not blocks:
        raise InvalidArgumentError(f"the held-out text is {len(ids)} token(s) long: nothing to predict; give a longer "
                                   "text", option="eval_text")
    return blocks


@dataclass(frozen=True)
class Perplexity:
    """A token-weighted score of a text.

    Attributes:
        nll_sum: the sum of the negative log-likelihoods (nats) of every predicted token.
        tokens: how many tokens were predicted.
    """

    nll_sum: float
    tokens: int

    @property
    def nll(self) -> float:
        """Mean NLL per predicted token (nats)."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        """``exp(nll)``."""
        return math.exp(self.nll)

    @classmethod
    def from_logprobs(cls, logprobs: Tensor) -> Perplexity:
        """The score of per-token log-probabilities (one per predicted token)."""
        return cls(nll_sum=float(-logprobs.double().sum()), tokens=int(logprobs.numel()))

    def as_metrics(self) -> dict[str, float]:
        """``{"nll", "ppl", "tokens"}`` as evaluation rows and manifests hold them."""
        return {"nll": self.nll, "ppl": self.perplexity, "tokens": float(self.tokens)}


def _batches(blocks: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterable[tuple[Tensor, Tensor]]:
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i:i + batch_size]
        width = max(len(b) for b in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, b in enumerate(chunk):
            ids[r, :len(b)] = torch.tensor(b, dtype=torch.long)
            mask[r, :len(b)] = 1
        yield ids, mask


def token_logprobs(model: nn.Module, blocks: Sequence[Sequence[int]], *, batch_size: int = 8,
                   device: str | torch.device = "cpu", pad_id: int = 0, progress: bool = False,
                   desc: str = "perplexity") -> Tensor:
    """``log p(token | the tokens before it in its block)`` of every predicted token, in text order.

    Blocks are run ``batch_size`` at a time, right-padded (the pads are masked and never scored; they come
    after every real token, so a causal model's predictions of real tokens do not see them).

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits`` of shape ``(B, T, V)``), on ``device``.
        blocks: token ids (:func:`token_blocks`).
        batch_size: blocks per forward pass.
        device: where the forward passes run.
        pad_id: the id padded with (any valid id: pads are masked).
        progress: a transient progress bar on stderr.
        desc: the bar's label.

    Returns:
        A float64 CPU tensor of ``sum(len(b) - 1 for b in blocks)`` log-probabilities.
    """
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    batches: Iterable[tuple[Tensor, Tensor]] = _batches(blocks, batch_size, pad_id)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc=desc, unit="block", leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for ids, mask in batches:
                ids, mask = ids.to(dev), mask.to(dev)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
                # Keep the predicted real tokens, row by row: text order.
                out.append(logp[mask[:, 1:].bool()].double().cpu())
                if bar is not None:
                    bar.update(ids.shape[0])
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def mixture_logprobs(logprobs: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Per-token log-probabilities of the prediction ensemble: ``log sum_i w_i p_i(token) / sum_i w_i``.

    The ensemble of language models averages their next-token distributions; its probability of the
    observed token is the weighted mean of the members', so only each member's log-probability of the
    observed tokens is needed (not the whole vocabulary).

    Example:
        >>> lp = mixture_logprobs([torch.tensor([0.5]).log(), torch.tensor([0.25]).log()])
        >>> round(float(lp.exp()), 6)
        0.375
    """
    w = torch.tensor([1.0] * len(logprobs) if weights is None else [float(x) for x in weights], dtype=torch.float64)
    stacked = torch.stack([lp.double() for lp in logprobs])  # (M, N)
    return torch.logsumexp(stacked + w.log()[:, None], dim=0) - w.sum().log()


def _tokenizer_digest(member: str | os.PathLike) -> str:
    h = hashlib.sha256()
    folder = _folder(member)
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class LanguageModelEvaluator:
    """Scores causal-LM state dicts by perplexity on one held-out text, with one model and one tokenisation.

    Built by :meth:`from_members`: the model is built from the first member's config (float32), the text
    is tokenised once with the first member's tokenizer, and any number of state dicts (members, candidate
    soups) are loaded into that model and scored.
    """

    def __init__(self, folder: str | os.PathLike, blocks: list[list[int]], *, batch_size: int = 8,
                 device: str | torch.device = "cpu", progress: bool = False, pad_id: int = 0,
                 block_size: int | None = None, eval_text: str | os.PathLike = "the text"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.blocks = str(folder), blocks
        self.batch_size, self.progress, self.pad_id = batch_size, progress, pad_id
        self.device = resolve_device(device)
        config = AutoConfig.from_pretrained(str(_folder(folder)))
        self.model = AutoModelForCausalLM.from_config(config).float().to(self.device)
        self.tokens = sum(len(b) - 1 for b in blocks)
        self.block_size = block_size if block_size is not None else max(len(b) for b in blocks)
        self.eval_text = str(eval_text)

    @classmethod
    def from_members(cls, members: Sequence[str | os.PathLike], *, eval_text: str | os.PathLike,
                     block_size: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                     progress: bool = False) -> LanguageModelEvaluator:
        """Check the members and read the text; every member is checked before any model is built.

        Args:
            members: causal-LM folders (or ``hf://`` references) of one architecture and tokenizer.
            eval_text: the held-out text (:func:`read_eval_texts`).
            block_size: tokens per block; default the smaller of 1024 and the model's context length.
            batch_size: blocks per forward pass.
            device, progress: where the model runs; a progress bar over each pass.

        Raises:
            InvalidArgumentError: a member is not a causal LM, the text is empty, or ``block_size`` exceeds
                the model's context.
            CheckpointNotFoundError: a member or the text is missing, or a member has no tokenizer files.
            MismatchError: members of different architectures, vocabularies or tokenizers.
        """
        if not members:
            raise InvalidArgumentError("no language models given")
        archs = [_check_causal_lm(m) for m in members]
        configs = [json.loads((_folder(m) / "config.json").read_text()) for m in members]
        for m, arch, cfg in zip(members[1:], archs[1:], configs[1:]):
            for key, mine, first in (("architecture", arch, archs[0]), ("vocab_size", cfg.get("vocab_size"),
                                                                          configs[0].get("vocab_size"))):
                if mine != first:
                    raise MismatchError(f"{m} has {key} {mine!r}, but {members[0]} has {first!r}; score language "
                                        "models of one architecture and vocabulary together", path=m)
        tokenizer = _load_tokenizer(members[0])
        digest = _tokenizer_digest(members[0])
        for i, m in enumerate(members[1:], 1):
            _check_tokenizer_files(m)
            if _tokenizer_digest(m) != digest:
                raise MismatchError(f"{m}: its tokenizer files differ from {members[0]}'s; members scored on one text "
                                    "must share one tokenizer (the text is tokenised once)", path=m, member=i)
        context = _context_length(configs[0])
        if block_size is None:
            block_size = min(1024, context) if context else 1024
        elif context and block_size > context:
            raise InvalidArgumentError(f"block_size {block_size} is longer than {members[0]}'s context of {context} "
                                       f"tokens; pass at most {context}", option="block_size")
        blocks = token_blocks(read_eval_texts(eval_text), tokenizer, block_size=block_size)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (_end_token(tokenizer) or 0)
        return cls(members[0], blocks, batch_size=batch_size, device=device, progress=progress, pad_id=int(pad),
                   block_size=block_size, eval_text=eval_text)

    def label(self) -> str:
        """How scores are obtained: ``perplexity of val.jsonl (20,480 tokens, blocks of 128)``."""
        return (f"perplexity of {Path(self.eval_text).name} ({self.tokens:,} tokens predicted, blocks of "
                f"{self.block_size})")

    def state_dict_of(self, member: str | os.PathLike) -> dict[str, Tensor]:
        """A member folder's tensors."""
        with open_checkpoint(member) as src:
            return src.state_dict()

    def logprobs(self, state_dict: Mapping[str, Tensor], *, desc: str = "perplexity") -> Tensor:
        """Per-token log-probabilities of the text under ``state_dict`` (:func:`token_logprobs`)."""
        load_into(self.model, state_dict)
        return token_logprobs(self.model, self.blocks, batch_size=self.batch_size, device=self.device,
                              pad_id=self.pad_id, progress=self.progress, desc=desc)

    def perplexity_of(self, state_dict: Mapping[str, Tensor]) -> Perplexity:
        """The perplexity of the text under ``state_dict``."""
        return Perplexity.from_logprobs(self.logprobs(state_dict))

    def scorer(self) -> StateDictScore:
        """``score(state_dict) = -NLL per token``: higher is better, as :func:`merge.greedy.greedy_soup` wants.

        Perplexity is ``exp(-score)``; the NLL itself is the score (not the perplexity) so that no rounding of
        ``exp`` can make two different NLLs tie.
        """
        return lambda state_dict: -self.perplexity_of(state_dict).nll


def _check_tokenizer_files(member: str | os.PathLike) -> None:
    if not any((_folder(member) / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointNotFoundError(f"{member}: has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...), "
                                      "which perplexity needs to read the text; save them into the folder with "
                                      "tokenizer.save_pretrained(folder)", path=member)


def _context_length(config: Mapping[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None
