"""Shared pytest setup. Each engineer's fixtures live in their own test files or in clearly named blocks here."""

from __future__ import annotations

import os

# Tests never reach the real Hugging Face Hub or use the user's cache/token.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
