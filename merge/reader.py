"""The chunk reader: reads the merge's input chunks on a thread, ahead of the reductions.

The engine knows, before the first byte is read, every chunk it will ask for and in which order
(each operator's passes are fixed by the tensor's size and the parameters, never by the data).
:class:`ChunkReader` walks that list on a thread, reading each chunk with ``pread`` into one of a
small pool of reused byte buffers, so the next chunks are being read while the current one is
reduced; the consumer takes them in the same order and hands each buffer back when done with it.
Memory is the pool, whatever the number of members or the size of the model.

With a CUDA device the pool is pinned host memory, each chunk is copied to the GPU asynchronously
when taken, and a buffer is reused only once a CUDA event says the copy out of it has finished.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from merge.backend.arrays import TORCH

if TYPE_CHECKING:
    import torch
from merge.io.sources import Source

__all__ = ["Read", "Chunk", "ChunkReader", "POOL_BUFFERS", "CPU"]  # noqa: F822 - CPU: module __getattr__

POOL_BUFFERS = 4
_DONE = object()


def __getattr__(name: str) -> object:
    if name == "CPU":  # torch's CPU device, made on first use (a plan of the numpy backend imports no torch)
        import torch

        globals()["CPU"] = cpu = torch.device("cpu")
        return cpu
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Read:
    """One chunk to read: elements ``start .. start + count - 1`` of tensor ``name`` of source ``source``."""

    source: int
    name: str
    start: int
    count: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


class Chunk:
    """A chunk handed to the consumer: ``tensor`` (on the merge device, in the source's dtype ``dtype``)."""

    __slots__ = ("tensor", "nbytes", "dtype", "_reader", "_slot")

    def __init__(self, tensor: torch.Tensor, nbytes: int, reader: ChunkReader, slot: int, dtype: object = None):
        self.tensor, self.nbytes, self._reader, self._slot = tensor, nbytes, reader, slot
        self.dtype = dtype

    def release(self) -> None:
        """Give the buffer back to the reader (after the last use of ``tensor``)."""
        if self._slot is not None:
            self._reader._release(self._slot)
            self._slot = None


class ChunkReader:
    """Prefetches the chunks of ``reads`` from ``sources`` into a pool of buffers, on a thread.

    Args:
        sources: the checkpoints, indexed by :attr:`Read.source`.
        reads: every chunk, in the order the consumer will :meth:`take` them.
        buffer_bytes: size of each pool buffer (at least the largest chunk).
        device: where :meth:`take` puts the chunks (None: the CPU; CUDA via pinned buffers).
        buffers: pool size; the consumer may hold at most ``buffers - 1`` chunks at once.
        progress: called with the bytes of each chunk taken.
        arrays: the array backend (:mod:`merge.backend.arrays`) the chunks are handed out in: torch (default) or numpy.

    Use as a context manager; :meth:`take` must follow ``reads`` exactly (it checks).
    """

    def __init__(self, sources: Sequence[Source], reads: Iterable[Read], *, buffer_bytes: int,
                 device: torch.device | None = None, buffers: int = POOL_BUFFERS,
                 progress: Callable[[int], None] | None = None, arrays=TORCH):
        self.sources, self.device, self.progress = list(sources), device, progress
        self.cuda = device is not None and device.type == "cuda"
        self.xp = arrays
        self._reads = reads
        self._pool = [arrays.bytes_buffer(max(1, buffer_bytes), pinned=self.cuda) for _ in range(buffers)]
        self._free: queue.Queue = queue.Queue()
        for i in range(buffers):
            self._free.put((i, None))
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="papa-merge-reader", daemon=True)

    def _work(self) -> None:
        try:
            for r in self._reads:
                i, event = self._free.get()
                if self._stop.is_set():
                    return
                if event is not None:
                    event.synchronize()  # the GPU copy out of this pinned buffer has finished
                if r.nbytes:
                    self.sources[r.source].read_into(r.name, r.start * r.dtype.itemsize,
                                                     self.xp.memoryview(self._pool[i])[: r.nbytes])
                self._ready.put((r, i))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._ready.put(e)
            return
        self._ready.put(_DONE)

    def __enter__(self) -> ChunkReader:
        self._thread.start()
        return self

    def take(self, source: int, name: str, start: int, count: int) -> Chunk:
        """The next chunk, which must be ``(source, name, start, count)``."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise RuntimeError(f"chunk reader ran out of reads before {name!r}[{start}:{start + count}]")
        r, i = item
        if (r.source, r.name, r.start, r.count) != (source, name, start, count):
            raise RuntimeError(f"chunk reader out of step: read {r.name!r}[{r.start}:+{r.count}] of source "
                               f"{r.source}, asked for {name!r}[{start}:+{count}] of source {source}")
        raw = self._pool[i][: r.nbytes]
        if self.cuda:
            raw = raw.to(self.device, non_blocking=True)
        if self.progress:
            self.progress(r.nbytes)
        return Chunk(self.xp.view(raw, r.dtype), r.nbytes, self, i, r.dtype)

    def _release(self, slot: int) -> None:
        event = None
        if self.cuda:
            import torch

            event = torch.cuda.Event()
            event.record()
        self._free.put((slot, event))

    def finish(self) -> None:
        """Check that every scheduled read was taken (re-raises a reader error)."""
        tail = self._ready.get()
        if isinstance(tail, BaseException):
            raise tail
        if tail is not _DONE:
            raise RuntimeError("chunk reader has reads left over")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for i in range(len(self._pool)):
            self._free.put((i, None))  # unblock the reader if it waits for a buffer
        self._thread.join()
