"""What the benchmarks share: a description of the machine they ran on, for their results files."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """OS, CPU model, visible cores, torch version and threads, Python version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores visible, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")


def safetensors_tensors(folder: Path):
    """Every tensor of the ``*.safetensors`` files in ``folder`` (shards in name order), as ``(name, tensor)``."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k)
