"""The streaming merge loop: sources x operator -> sink, one tensor (and one chunk) at a time.

For every tensor name, in storage order: read a chunk of it from each member into a small pool of
reused byte buffers (on a reader thread, which prefetches the next chunks while the current one is
reduced), fold each into a float32 (or float64) accumulator, cast the result to the output dtype once,
and hand it to the sink, which writes it. Peak memory is the buffer pool plus three chunk-sized
tensors: it does not depend on the number of members or on the size of the model. Inputs are read
with ``pread`` into those buffers, so no file pages are mapped into the process.

With ``device="cuda[:N]"`` the pool is pinned host memory, each chunk is copied to the GPU
asynchronously, the reduction runs there, and the reader reuses a pinned buffer only after the copy
out of it has finished.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from merge.errors import DeviceUnavailableError, InvalidArgumentError, MismatchError
from merge.io.dtypes import dtype_name, is_float
from merge.io.sources import Source, TensorInfo
from merge.io.writer import Sink
from merge.ops import Operator

__all__ = ["TensorPlan", "MergePlan", "plan_merge", "run_merge", "resolve_device", "Sink", "MemorySink",
           "ON_MISMATCH"]

ON_MISMATCH = ("error", "skip", "first")
# Accumulator chunk. On the CPU, 2 MiB stays in cache (the sweet spot measured with bench_soup.py);
# on a GPU, larger chunks amortise the per-chunk launch and host synchronisation.
DEFAULT_CHUNK_BYTES = 2 << 20
GPU_CHUNK_BYTES = 64 << 20
POOL_BUFFERS = 4


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one output tensor: ``reduce`` over the members, or ``copy`` from the first."""

    name: str
    action: str  # "reduce" | "copy"
    in_dtypes: tuple[torch.dtype, ...]
    out: TensorInfo


@dataclass
class MergePlan:
    """Everything decided before the first byte is read: validated, with memory known in advance."""

    sources: list[Source]
    operator: Operator
    weights: list[float]
    coefficients: list[float]
    divisor: float
    tensors: list[TensorPlan]
    accumulate: torch.dtype
    device: torch.device
    chunk_elems: int
    skipped: list[str] = field(default_factory=list)
    copied_mismatched: list[str] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        """Bytes the merge reads from the members."""
        n = 0
        for t in self.tensors:
            members = len(self.sources) if t.action == "reduce" else 1
            n += members * t.out.numel * max(d.itemsize for d in t.in_dtypes[:members])
        return n

    @property
    def out_bytes(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)

    @property
    def buffer_bytes(self) -> int:
        """Working memory the loop allocates (pool, accumulator, converted chunk, output chunk)."""
        max_in = max((d.itemsize for t in self.tensors for d in t.in_dtypes), default=1)
        max_out = max((t.out.dtype.itemsize for t in self.tensors), default=1)
        elems = min(self.chunk_elems, max((t.out.numel for t in self.tensors), default=0))
        return elems * (POOL_BUFFERS * max_in + 2 * self.accumulate.itemsize + max_out)


class MemorySink(Sink):
    """Collects the output into CPU tensors (for :func:`merge.average`)."""

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        self.tensors = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in tensors}
        self._pos = dict.fromkeys(self.tensors, 0)

    def write(self, name: str, data: memoryview) -> None:
        flat = self.tensors[name].view(-1).view(torch.uint8)
        pos = self._pos[name]
        flat[pos: pos + len(data)].copy_(torch.frombuffer(data, dtype=torch.uint8))
        self._pos[name] = pos + len(data)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Check a device before any work: CPU always, CUDA only where torch sees that GPU.

    Raises:
        DeviceUnavailableError: CUDA asked for on a machine without it (or a GPU index out of range).
    """
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InvalidArgumentError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} asked for, but CUDA is not available on this machine (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); reduce on the CPU", option="device", choices=("cpu",))
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {device!r} asked for, but this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s): use cuda:0 .. "
                                     f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def _describe(src: Source, name: str) -> str:
    info = src.infos.get(name)
    return "missing" if info is None else f"{list(info.shape)} {dtype_name(info.dtype)}"


def plan_merge(sources: Sequence[Source], operator: Operator, *, weights: Sequence[float],
               dtype: torch.dtype | None = None,
               accumulate: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
               on_mismatch: str = "error", chunk_bytes: int | None = None) -> MergePlan:
    """Validate the members against each other and decide every output tensor.

    Raises:
        MismatchError: (with ``on_mismatch="error"``) members differ in names, shapes or dtypes; the
            message lists each offending tensor with every member's shape and dtype.
    """
    if on_mismatch not in ON_MISMATCH:
        raise InvalidArgumentError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
    if len(sources) < operator.min_members:
        raise InvalidArgumentError(f"method {operator.name!r} needs at least {operator.min_members} members, "
                                   f"got {len(sources)}")
    if operator.scope != "linear":
        raise InvalidArgumentError(f"method {operator.name!r} is not linear; the streaming engine merges linear "
                                   "operators only")
    first = sources[0]
    names = list(first.infos)
    seen = set(names)
    for src in sources[1:]:
        for name in src.infos:
            if name not in seen:
                seen.add(name)
                names.append(name)
    tensors: list[TensorPlan] = []
    bad: list[str] = []
    skipped: list[str] = []
    copied: list[str] = []
    for name in names:
        infos = [src.infos.get(name) for src in sources]
        ok = all(i is not None for i in infos) and len({(i.shape, i.dtype) for i in infos}) == 1
        if ok:
            info = infos[0]
            if is_float(info.dtype):
                out = TensorInfo(name, dtype or info.dtype, info.shape)
                tensors.append(TensorPlan(name, "reduce", tuple(i.dtype for i in infos), out))
            else:  # integer buffers (num_batches_tracked), bools: copied, never averaged
                tensors.append(TensorPlan(name, "copy", (info.dtype,), info))
            continue
        if on_mismatch == "error":
            bad.append(name)
        elif on_mismatch == "first" and infos[0] is not None:
            info = infos[0]
            copied.append(name)
            out = TensorInfo(name, dtype or info.dtype, info.shape) if is_float(info.dtype) else info
            tensors.append(TensorPlan(name, "copy", (info.dtype,), out))
        else:
            skipped.append(name)
    if bad:
        shown = bad[:20]
        lines = [f"  {name}: " + "; ".join(f"[{i}] {_describe(s, name)}" for i, s in enumerate(sources))
                 for name in shown]
        more = f"\n  ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        raise MismatchError(f"members disagree on {len(bad)} tensor(s) (name: [member] shape dtype):\n"
                            + "\n".join(lines) + more
                            + "\nfix the inputs, or drop those tensors (skip) or take member 0's (first)",
                            tensor=bad[0], option="on_mismatch", choices=("skip", "first"))
    if not tensors:
        raise MismatchError("the members share no tensor: nothing to merge")
    coeffs, divisor = operator.coefficients(list(weights))
    if chunk_bytes is None:
        chunk_bytes = GPU_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES
    return MergePlan(list(sources), operator, list(weights), list(coeffs), float(divisor), tensors, accumulate, device,
                     max(1, chunk_bytes // accumulate.itemsize), skipped, copied)


@dataclass
class MergeStats:
    seconds: float
    read_bytes: int
    written_bytes: int
    tensors: int


_DONE = object()


def run_merge(plan: MergePlan, sink: Sink, *, progress: Callable[[int], None] | None = None) -> MergeStats:
    """Execute a plan: stream every member's chunks through the operator into the sink.

    Args:
        plan: from :func:`plan_merge`.
        sink: receives each output tensor's bytes in plan order.
        progress: called with the number of input bytes just consumed.
    """
    t0 = time.perf_counter()
    dev = plan.device
    cuda = dev.type == "cuda"
    n = len(plan.sources)
    chunk = plan.chunk_elems
    max_in = max((d.itemsize for t in plan.tensors for d in t.in_dtypes), default=1)
    buf_elems = min(chunk, max((t.out.numel for t in plan.tensors), default=1)) or 1
    pool = [torch.empty(buf_elems * max_in, dtype=torch.uint8, pin_memory=cuda) for _ in range(POOL_BUFFERS)]
    free: queue.Queue = queue.Queue()
    for i in range(POOL_BUFFERS):
        free.put((i, None))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    # The reader walks the same order the consumer does: tensor, chunk, member.
    def work() -> None:
        try:
            for tp in plan.tensors:
                members = range(n) if tp.action == "reduce" else range(1)
                numel = tp.out.numel
                for start in range(0, numel, chunk):
                    count = min(chunk, numel - start)
                    for m in members:
                        i, event = free.get()
                        if stop.is_set():
                            return
                        if event is not None:
                            event.synchronize()  # the GPU copy out of this pinned buffer has finished
                        itemsize = tp.in_dtypes[m].itemsize
                        nbytes = count * itemsize
                        plan.sources[m].read_into(tp.name, start * itemsize, memoryview(pool[i].numpy())[:nbytes])
                        ready.put((i, nbytes))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            ready.put(e)
        ready.put(_DONE)

    reader = threading.Thread(target=work, name="papa-merge-reader", daemon=True)
    acc = torch.empty(buf_elems, dtype=plan.accumulate, device=dev)
    tmp = torch.empty(buf_elems, dtype=plan.accumulate, device=dev)
    out_bufs: dict[torch.dtype, torch.Tensor] = {}
    host_out: dict[torch.dtype, torch.Tensor] = {}
    written = 0

    def take() -> tuple[int, int]:
        item = ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(i: int) -> None:
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        free.put((i, event))

    sink.begin([t.out for t in plan.tensors])
    # One compute thread beside the reader thread: on small machines torch's own pool would fight the
    # reader for cores (and its idle workers spin), which measured 1.5-2x slower on 2 cores.
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    reader.start()
    try:
        for tp in plan.tensors:
            numel = tp.out.numel
            for start in range(0, numel, chunk):
                count = min(chunk, numel - start)
                if tp.action == "copy":
                    i, nbytes = take()
                    raw = pool[i][:nbytes]
                    if tp.out.dtype == tp.in_dtypes[0]:
                        sink.write(tp.name, memoryview(raw.numpy()))
                    else:  # a mismatched float tensor taken from member 0 and cast to --dtype
                        res = raw.view(tp.in_dtypes[0]).to(tp.out.dtype)
                        sink.write(tp.name, memoryview(res.view(torch.uint8).numpy()))
                    written += count * tp.out.dtype.itemsize
                    free.put((i, None))
                    if progress:
                        progress(nbytes)
                    continue
                a = acc[:count]
                for m in range(n):
                    i, nbytes = take()
                    raw = pool[i][:nbytes]
                    if cuda:
                        raw = raw.to(dev, non_blocking=True)
                    x = raw.view(tp.in_dtypes[m])
                    c = plan.coefficients[m]
                    if x.dtype != plan.accumulate:
                        # Converting into a reused buffer first is ~3.5x faster than a mixed-dtype add_.
                        tmp[:count].copy_(x)
                        x = tmp[:count]
                    if m == 0 and c == 1:
                        a.copy_(x)
                    elif m == 0:
                        torch.mul(x, c, out=a)
                    elif c == 1:
                        a.add_(x)
                    else:
                        a.add_(x, alpha=c)
                    release(i)
                    if progress:
                        progress(nbytes)
                if plan.divisor != 1:
                    a.div_(plan.divisor)
                res = a
                if tp.out.dtype != plan.accumulate:
                    ob = out_bufs.get(tp.out.dtype)
                    if ob is None:
                        ob = out_bufs[tp.out.dtype] = torch.empty(buf_elems, dtype=tp.out.dtype, device=dev)
                    res = ob[:count]
                    res.copy_(a)
                if cuda:
                    hb = host_out.get(tp.out.dtype)
                    if hb is None:
                        hb = host_out[tp.out.dtype] = torch.empty(buf_elems, dtype=tp.out.dtype, pin_memory=True)
                    hb[:count].copy_(res)  # synchronous: the bytes are on the host when this returns
                    res = hb[:count]
                sink.write(tp.name, memoryview(res.view(torch.uint8).numpy()))
                written += count * tp.out.dtype.itemsize
        tail = ready.get()
        if isinstance(tail, BaseException):
            raise tail
        sink.finish()
    finally:
        torch.set_num_threads(threads)
        stop.set()
        for i in range(POOL_BUFFERS):
            free.put((i, None))  # unblock the reader if it is waiting for a buffer
        reader.join()
    return MergeStats(time.perf_counter() - t0, plan.read_bytes, written, len(plan.tensors))
