"""Tiny transformers causal LMs (Llama, Mistral, Qwen2 shapes) for the mergekit recipe tests and benchmark.

A base is built by transformers (``from_config``, ``save_pretrained``); its fine-tunes are the base's tensors
plus seeded noise, written beside a copy of its config, so a model family costs one transformers build.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2")


def tiny_config(arch: str = "llama", *, layers: int = 4, hidden: int = 16, vocab: int = 64):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)


def tiny_base(folder: Path, arch: str = "llama", *, layers: int = 4, hidden: int = 16, seed: int = 0) -> Path:
    """A randomly initialised tiny model saved as a transformers folder (config.json, model.safetensors)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, hidden=hidden))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_finetune(base: Path, folder: Path, *, seed: int, scale: float = 0.005) -> Path:
    """``base`` plus seeded Gaussian noise in every floating tensor, with the base's config."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base / "config.json", folder / "config.json")
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(base / "model.safetensors"))
    out = {k: (v + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
           for k, v in sd.items()}
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def family(root: Path, arch: str = "llama", *, n: int = 2, layers: int = 4, hidden: int = 16) -> dict[str, Path]:
    """A base and ``n`` fine-tunes of it under ``root``: ``{"base": ..., "m0": ..., ...}``."""
    paths = {"base": tiny_base(root / f"{arch}-base", arch, layers=layers, hidden=hidden)}
    for i in range(n):
        paths[f"m{i}"] = tiny_finetune(paths["base"], root / f"{arch}-m{i}", seed=100 + i)
    return paths
