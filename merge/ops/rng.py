"""Random numbers keyed by (seed, tensor name, member, element position).

DARE and DELLA drop each element of a task vector with some probability. The draw for element ``j``
of member ``i``'s tensor ``name`` depends only on ``(seed, name, i, j)``: the flattened tensor is cut
into blocks of :data:`BLOCK` elements, block ``b`` gets its own PCG64 generator seeded with
``(seed, hash(name), i, b)``, and element ``j`` takes the ``j % BLOCK``-th float of block
``j // BLOCK``. So a chunked merge draws exactly what a whole-tensor merge draws, whatever the chunk
size and the device, and a rerun draws the same again. (mergekit draws with ``torch.bernoulli`` from
torch's global generator, whose stream depends on the order tensors are processed; no other tool
can reproduce it, so papa-merge matches its statistics, not its bits.)

The floats are generated on the CPU with numpy and copied to the device, so a GPU merge draws the
same numbers as a CPU merge.
"""

from __future__ import annotations

import hashlib

import numpy as np
from merge.ops._lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["BLOCK", "rng_key", "uniforms"]

BLOCK = 1 << 16


def rng_key(seed: int, name: str, member: int) -> tuple[int, ...]:
    """The words that key member ``member``'s draws for tensor ``name``."""
    digest = hashlib.blake2b(f"{name}".encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i: i + 4], "little") for i in range(0, 16, 4)]
    return (int(seed) & 0xFFFFFFFFFFFFFFFF, *words, int(member))


def uniforms(key: tuple[int, ...], start: int, count: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``count`` float32 uniforms in [0, 1) for flattened positions ``start .. start + count - 1``."""
    out = np.empty(count, dtype=np.float32)
    if count:
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        for b in range(first, last + 1):
            lo, hi = max(start, b * BLOCK), min(start + count, (b + 1) * BLOCK)
            gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*key, b])))
            if lo == b * BLOCK:
                gen.random(hi - lo, dtype=np.float32, out=out[lo - start: hi - start])
            else:  # a chunk that starts inside a block: draw the block's prefix and keep its tail
                out[lo - start: hi - start] = gen.random(hi - b * BLOCK, dtype=np.float32)[lo - b * BLOCK:]
    t = torch.from_numpy(out)
    return t if device is None or device.type == "cpu" else t.to(device, non_blocking=False)
