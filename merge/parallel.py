"""A merge split by tensors across processes: ``jobs`` local workers, or the ranks of ``torchrun``.

Every output tensor is computed by one kernel from the members' bytes of that tensor alone (random
operators draw from generators keyed by the seed and the tensor's name), so who computes a tensor
does not change its bits. The split:

1. every process plans the merge from the same inputs (the same :class:`merge.engine.MergePlan`);
   the ranks compare a digest of their plans before reading any tensor;
2. :func:`split_tensors` cuts the output's tensors, in output order, into one contiguous share per
   process, balanced by bytes read (every pass of the operator counted) plus bytes written; when the
   output has at least as many shard files as processes, the cuts fall between whole shards;
3. the coordinator (the parent of the workers, or rank 0) creates every output file at its final
   size with its header (:func:`merge.io.writer.presize_output`), under the output's temporary name;
4. each process streams its share through :func:`merge.engine.run_merge` into the byte ranges of
   its tensors (:class:`merge.io.writer.OffsetSink`);
5. once every process succeeded, the coordinator writes the shard index, config and tokenizer files
   and the model card, and renames the output into place. If any failed (an error, a killed worker,
   a signal), the others are stopped, the temporary output is removed, and the error names the
   process and the cause.

The files are those one process writes, byte for byte, except the recipe in the header, which records
``"processes": N``. A torch state-dict output (``.pt``) is one zip stream: it is written by one process
(:class:`SingleWriterWarning`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import queue
import resource
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path


from merge.engine import MergePlan, MergeStats, run_merge
from merge.errors import InvalidArgumentError, MergeError, MergeWarning
from merge.io.atomic import AtomicOutput
from merge.io.sources import Source
from merge.lora import open_member
from merge.io.writer import OffsetSink, OutputPlan, Place, presize_output
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["DEFAULT_JOBS", "WorkerFailedError", "SingleWriterWarning", "split_tensors", "balanced_cuts", "check_jobs",
           "process_group_world", "launched_world_size", "MergeGroup", "run_split", "WorkerReport", "plan_digest",
           "describe_reports", "check_resources"]

# One process unless asked: a second process pays off only with a core and memory bandwidth to spare,
# which a shared machine cannot promise (see docs/merging.md, "Several processes").
DEFAULT_JOBS = 1
_PROGRESS_EVERY = 0.2  # seconds between a worker's progress messages (and its checks that the parent lives)
_TAG = "papa_merge_split"


class WorkerFailedError(MergeError, RuntimeError):
    """A process of a split merge failed or died; nothing was published."""


class SingleWriterWarning(MergeWarning):
    """A split merge asked for an output only one process can write (a torch state-dict file)."""


@dataclass
class WorkerReport:
    """What one process of a split merge did: its rank, tensors, bytes, seconds and peak memory (resident)."""

    rank: int
    tensors: int
    read_bytes: int
    written_bytes: int
    seconds: float
    peak_rss_bytes: int
    nonfinite: list = field(default_factory=list)


def check_jobs(jobs: int) -> int:
    """``jobs`` as a count of processes, refused unless a positive integer.

    Raises:
        InvalidArgumentError: not an integer of at least 1.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgumentError(f"jobs must be a whole number of processes, at least 1; got {jobs!r}",
                                   option="jobs", choices=(1,))
    return jobs


# --- who computes what ------------------------------------------------------------------------------------
def _tensor_costs(plan: MergePlan) -> list[int]:
    """Per output tensor: bytes read (every pass) plus bytes written, the work a process spends on it."""
    return [sum(r.nbytes for r in k.reads()) + k.tp.out.nbytes for k in plan.kernels()]


def balanced_cuts(costs: Sequence[int], parts: int) -> list[int]:
    """Boundaries ``0 = b0 <= b1 <= ... <= b_parts = len(costs)`` cutting ``costs`` into contiguous parts of
    nearly equal sums: part ``r`` ends where the running sum comes nearest to ``(r + 1) / parts`` of the total."""
    n = len(costs)
    total = sum(costs)
    bounds = [0]
    running, i = 0, 0
    for r in range(1, parts):
        target = total * r / parts
        # leave at least one item for each part still to come (when there are enough)
        limit = max(bounds[-1], n - (parts - r)) if n >= parts else min(n, r)
        while i < limit and abs(running + costs[i] - target) <= abs(running - target):
            running += costs[i]
            i += 1
        if i == bounds[-1] and i < limit:  # every part gets something while items last
            running += costs[i]
            i += 1
        bounds.append(i)
    bounds.append(n)
    return bounds


def split_tensors(plan: MergePlan, out: OutputPlan | None, world: int) -> list[list[str]]:
    """The output tensors each of ``world`` processes computes, in output order.

    Contiguous shares balanced by bytes read and written; whole shards when the output has at least
    ``world`` of them (each process then writes files of its own). The same on every process.

    Example:
        >>> # a plan of 4 equal tensors over 2 processes: [['a', 'b'], ['c', 'd']]
    """
    names = [t.name for t in plan.tensors]
    by_name = dict(zip(names, _tensor_costs(plan)))
    order = [t.name for t in out.tensors] if out is not None else names
    if out is not None and len(out.files) >= world:
        units = [[t.name for t in f.tensors] for f in out.files]
    else:
        units = [[n] for n in order]
    bounds = balanced_cuts([sum(by_name[n] for n in u) for u in units], world)
    return [[n for u in units[bounds[r]: bounds[r + 1]] for n in u] for r in range(world)]


def plan_digest(plan: MergePlan) -> str:
    """A digest of what a plan computes (tensors, actions, dtypes, shapes, parameters): equal on every rank."""
    h = hashlib.sha256()
    for t in plan.tensors:
        h.update(repr((t.name, t.action, t.in_dtypes, t.out.dtype, t.out.shape, t.copy_from,
                       None if t.resolved is None else repr(t.resolved))).encode())
    h.update(repr((plan.operator.name, plan.weights, plan.coefficients, plan.seed, plan.accumulate,
                   plan.chunk_elems, len(plan.sources), plan.base is not None)).encode())
    return h.hexdigest()


# A worker's own cost besides the plan's buffers: a Python process with torch imported (measured: ~320 MB resident).
WORKER_OVERHEAD_BYTES = 320 << 20


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``FIELD:  N kB`` line of a /proc file, in bytes (None where Linux's /proc is not there)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _available_memory() -> int | None:
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def check_resources(plan: MergePlan, out: OutputPlan, processes: int, *, local: bool) -> None:
    """Before any worker starts: free disk for the output beside it, and (``local``: the workers share this
    machine) memory for every worker's buffers.

    Raises:
        OSError: (``ENOSPC``) the output's file system has less free space than the output needs.
        InvalidArgumentError: the workers would need more memory than this machine has available.
    """
    folder = out.path.parent if str(out.path.parent) else Path(".")
    free = shutil.disk_usage(folder).free
    if free < out.nbytes:
        raise OSError(errno.ENOSPC, f"the output needs {_size(out.nbytes)} but its file system has {_size(free)} free; "
                                    "free some space or write it elsewhere", str(out.path))
    available = _available_memory() if local else None
    need = processes * (plan.buffer_bytes + WORKER_OVERHEAD_BYTES)
    if available is not None and need > available:
        fits = max(1, available // (plan.buffer_bytes + WORKER_OVERHEAD_BYTES))
        raise InvalidArgumentError(f"{processes} workers need about {need / 2**30:.1f} GiB of memory (buffers and a "
                                   f"Python process each) but {available / 2**30:.1f} GiB is available; use at most "
                                   f"{fits}", option="jobs", choices=(int(fits),))


def _share(plan: MergePlan, names: Sequence[str]) -> MergePlan:
    wanted = set(names)
    return replace(plan, tensors=[t for t in plan.tensors if t.name in wanted])


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` where Linux has it (``ru_maxrss`` also counts the
    parent's memory when the process was started by vfork and exec, as ``subprocess`` does)."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _run_share(plan: MergePlan, names: Sequence[str], places: Mapping[str, Place], rank: int,
               progress: Callable[[int], None] | None) -> WorkerReport:
    sink = OffsetSink({n: places[n] for n in names})
    share = _share(plan, names)
    try:
        if share.tensors:
            stats = run_merge(share, sink, progress=progress)
        else:
            stats = MergeStats(0.0, 0, 0, 0)
    finally:
        sink.close()
    return WorkerReport(rank, stats.tensors, stats.read_bytes, stats.written_bytes, stats.seconds, _peak_rss(),
                        stats.nonfinite)


def _summed(reports: Sequence[WorkerReport], seconds: float) -> MergeStats:
    return MergeStats(seconds, sum(r.read_bytes for r in reports), sum(r.written_bytes for r in reports),
                      sum(r.tensors for r in reports), [x for r in reports for x in r.nonfinite])


def _named(e: BaseException, rank: int, world: int, what: str) -> BaseException:
    """The worker's error, its message led by which process raised it (the type kept, so callers' excepts work)."""
    who = f"{what} {rank} of {world}"
    if isinstance(e, MergeError):
        e.message = f"{who}: {e.message}"
        e.args = (e.message,)
        return e
    if isinstance(e, OSError) and e.strerror:
        e.strerror = f"{who}: {e.strerror}"
        return e
    return WorkerFailedError(f"{who} failed: {type(e).__name__}: {e}; nothing was written")


# --- local workers (--jobs) ---------------------------------------------------------------------------------
def _open_sources(spec: Mapping[str, object]) -> tuple[list[Source], Source | None]:
    key = spec.get("key")
    members = [open_member(m, key=key) for m in spec["members"]]  # base+adapter: merge.lora
    base = open_member(spec["base"], key=key) if spec.get("base") is not None else None
    return members, base


def _worker_main(rank: int, world: int, planner: Callable[..., MergePlan], spec: dict, names: list[str],
                 places: dict[str, Place], digest: str, messages: object, parent: int) -> None:
    """One local worker: plan as the parent did, check the plan is the same, merge its share, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    torch.set_num_threads(1)
    sources: list[Source] = []
    try:
        members, base = _open_sources(spec)
        sources = members + ([base] if base is not None else [])
        kw = {k: v for k, v in spec.items() if k not in ("members", "base", "key")}
        if isinstance(kw.get("device"), str) and kw["device"] == "cuda" and torch.cuda.device_count() > 1:
            kw["device"] = f"cuda:{rank % torch.cuda.device_count()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the parent already warned about the plan
            plan = planner(spec["members"], sources=members, base_source=base, **kw)
        if plan_digest(plan) != digest:
            raise WorkerFailedError("the inputs changed between planning and merging (this worker's plan differs "
                                    "from the parent's); merge again once the members stay put")
        sent = [time.monotonic(), 0]

        def progress(nbytes: int) -> None:
            sent[1] += nbytes
            now = time.monotonic()
            if now - sent[0] >= _PROGRESS_EVERY:
                if os.getppid() == 1 or not _alive(parent):
                    os._exit(1)  # the parent is gone: nothing will publish this output
                messages.put(("progress", rank, sent[1]))
                sent[:] = [now, 0]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = _run_share(plan, names, places, rank, progress)
        messages.put(("progress", rank, sent[1]))
        seen = [(w.category, str(w.message)) for w in caught if issubclass(w.category, Warning)]
        messages.put(("done", rank, report, seen))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, which names this worker
        try:
            pickle.dumps(e)
            err = e
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
            err = RuntimeError(f"{type(e).__name__}: {e}")
        messages.put(("error", rank, err, traceback.format_exc()))
    finally:
        for s in sources:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _context():
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # The server imports torch and papa-merge once; each worker is then a fork of it (fast), never of the
        # parent (whose threads a fork would copy in an unknown state).
        ctx.set_forkserver_preload(["merge.parallel", "merge.soups"])
        return ctx
    return mp.get_context("spawn")


def _run_local(plan: MergePlan, shares: list[list[str]], places: dict[str, Place], *, planner: Callable,
               spec: dict, progress: Callable[[int], None] | None) -> list[WorkerReport]:
    """Start one worker per share, relay progress and warnings, and stop every worker at the first failure."""
    world = len(shares)
    ctx = _context()
    messages = ctx.Queue()
    digest = plan_digest(plan)
    procs = [ctx.Process(target=_worker_main, name=f"papa-merge worker {r}", daemon=True,
                         args=(r, world, planner, spec, shares[r], places, digest, messages, os.getpid()))
             for r in range(world)]
    reports: dict[int, WorkerReport] = {}
    try:
        for p in procs:
            p.start()
        while len(reports) < world:
            try:
                msg = messages.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is not None]
                if dead:
                    _drain_or_fail(messages, procs, reports, dead, progress)
                continue
            _handle(msg, reports, world, progress)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        messages.close()
    return [reports[r] for r in range(world)]


def _handle(msg: tuple, reports: dict[int, WorkerReport], world: int,
            progress: Callable[[int], None] | None) -> None:
    kind, rank = msg[0], msg[1]
    if kind == "progress":
        if progress:
            progress(msg[2])
    elif kind == "done":
        reports[rank] = msg[2]
        for category, text in msg[3]:
            warnings.warn(category(text), stacklevel=5)
    else:
        err, tb = msg[2], msg[3]
        if os.environ.get("PAPA_MERGE_DEBUG"):
            print(f"worker {rank} of {world}:\n{tb}", flush=True)
        raise _named(err, rank, world, "worker")


def _drain_or_fail(messages: object, procs: list, reports: dict[int, WorkerReport], dead: list[int],
                   progress: Callable[[int], None] | None) -> None:
    """A worker exited: read what it sent before it went (its result or its error), else it died unheard."""
    world = len(procs)
    deadline = time.monotonic() + 2.0
    while any(r not in reports for r in dead) and time.monotonic() < deadline:
        try:
            _handle(messages.get(timeout=0.1), reports, world, progress)
        except queue.Empty:
            continue
    for r in dead:
        if r not in reports:
            code = procs[r].exitcode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise WorkerFailedError(f"worker {r} of {world} {how} before finishing its share of the merge; the other "
                                    "workers were stopped and nothing was written")


# --- torch.distributed ranks (torchrun) ---------------------------------------------------------------------
def launched_world_size() -> int:
    """How many processes ``torchrun`` (or any launcher setting ``WORLD_SIZE``) started; 1 when run alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def process_group_world() -> int:
    """Processes of the initialised default ``torch.distributed`` group (1 when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class MergeGroup:
    """Join the default process group for a merge: an existing one as it is, or (under a launcher with several
    processes) one set up from the environment, gloo on the CPU and NCCL for a CUDA device, torn down on exit.

    ``device`` is the merge's device, a bare ``cuda`` made ``cuda:LOCAL_RANK``; :attr:`device` holds it.
    """

    def __init__(self, device: str | torch.device | None):
        self.device = device
        self._ours = False

    def __enter__(self) -> MergeGroup:
        import torch.distributed as dist

        dev = torch.device(self.device if self.device is not None else "cpu")
        if dev.type == "cuda" and dev.index is None and launched_world_size() > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            self.device = dev
        if dist.is_available() and not dist.is_initialized() and launched_world_size() > 1:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            self._ours = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ours:
            import torch.distributed as dist

            dist.destroy_process_group()


def _lost(e: RuntimeError) -> WorkerFailedError:
    import torch.distributed as dist

    return WorkerFailedError(f"rank {dist.get_rank()} of {dist.get_world_size()} lost contact with the other ranks "
                             f"(one died or was stopped: {str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "nothing was published")


def _gather(obj: object) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as e:
        raise _lost(e) from e
    return out


def _broadcast(obj: object) -> object:
    import torch.distributed as dist

    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise _lost(e) from e
    return box[0]


def _check_same_plan(plan: MergePlan) -> None:
    digests = _gather(plan_digest(plan))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise WorkerFailedError(f"rank {differ[0]} of {len(digests)} planned a different merge than rank 0 (its "
                                "members differ: another copy, or another version); give every rank the same inputs")


def _rank_outcome(fn: Callable[[], object]) -> tuple[object, BaseException | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every rank's failure is shared, so all ranks stop together
        return None, e


class _Stopped(WorkerFailedError):
    """This rank stopped its share because another rank failed (reported as that rank's error)."""


def _raise_first_failure(outcomes: Sequence[tuple[bool, object]], world: int,
                         own: BaseException | None = None) -> None:
    """Raise the first rank's failure (a rank that only stopped because another failed comes last), with this
    rank's own outcome as its cause."""
    order = sorted(range(len(outcomes)), key=lambda r: isinstance(outcomes[r][1], _Stopped))
    for r in order:
        ok, err = outcomes[r]
        if not ok:
            e = _named(err if isinstance(err, BaseException) else WorkerFailedError(str(err)), r, world, "rank")
            raise e from (own if isinstance(own, _Stopped) else None)


class _Alarm:
    """A failing rank tells the others at once, so they stop their shares instead of finishing them.

    A gloo group beside the default one (which may be NCCL): each rank sends its flag (0 done, 1 failed) to
    every other when it leaves its share; a thread receives the others' flags (from any rank, in the order
    they come) and the progress callback, called for every chunk read, stops the share at a failed one.
    """

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.group = dist.new_group(backend="gloo")
        self.peers = [r for r in range(world) if r != rank]
        self.failed: int | None = None
        self._thread = threading.Thread(target=self._listen, name="papa-merge rank alarm", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        import torch.distributed as dist

        box = torch.zeros(1, dtype=torch.int64)
        for _ in self.peers:
            try:
                sender = dist.recv(box, group=self.group)  # from whichever rank tells first
            except RuntimeError:
                return  # a rank died: the exchange after the shares says so
            if int(box) == 1 and self.failed is None:
                self.failed = sender

    def watch(self, progress: Callable[[int], None] | None) -> Callable[[int], None]:
        def check(nbytes: int) -> None:
            if progress:
                progress(nbytes)
            if self.failed is not None:
                raise _Stopped(f"rank {self.rank} of {self.world} stopped its share: rank {self.failed} failed")

        return check

    def close(self, failed: bool) -> None:
        import torch.distributed as dist

        flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
        try:
            for work in [dist.isend(flag, dst=p, group=self.group) for p in self.peers]:
                work.wait()
        except RuntimeError as e:
            raise _lost(e) from e
        self._thread.join()
        dist.destroy_process_group(self.group)


def _portable(e: BaseException | None) -> tuple[bool, object]:
    if e is None:
        return True, None
    try:
        pickle.dumps(e)
        return False, e
    except Exception:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


# --- the one entry point --------------------------------------------------------------------------------------
def run_split(plan: MergePlan, out: OutputPlan, atomic: AtomicOutput | BaseException | None, meta: Mapping[str, str], *,
              jobs: int, planner: Callable[..., MergePlan] | None = None, spec: dict | None = None,
              progress: Callable[[int], None] | None = None,
              finish: Callable[[], object] | None = None) -> tuple[MergeStats, list[WorkerReport], object]:
    """Run ``plan`` into the files of ``out`` with ``jobs`` local workers, or over the ranks of the process group.

    With a process group of several ranks, ``atomic`` is rank 0's (None on the others; the error that kept rank 0
    from opening it, which every rank then raises); ``finish`` runs on
    rank 0 once every rank succeeded (the index, card and commit) and its result is returned on every rank.
    Without one, ``planner(spec["members"], sources=..., base_source=..., **spec)`` rebuilds the plan in
    each of ``jobs`` workers (``spec``: picklable, members and base as paths).

    Returns:
        The merge's statistics (summed over the processes), one :class:`WorkerReport` per process, and
        what ``finish`` returned.

    Raises:
        WorkerFailedError: a process died, or planned a different merge; the original error type (its
            message led by ``worker R of N`` or ``rank R of N``) for any other failure.
    """
    t0 = time.perf_counter()
    world = process_group_world()
    if world > 1:
        return _run_ranks(plan, out, atomic, meta, progress=progress, finish=finish, t0=t0)
    check_resources(plan, out, jobs, local=True)
    shares = split_tensors(plan, out, jobs)
    places = presize_output(out, atomic, meta)
    reports = _run_local(plan, shares, places, planner=planner, spec=spec or {}, progress=progress)
    stats = _summed(reports, time.perf_counter() - t0)
    return stats, reports, finish() if finish is not None else None


def _run_ranks(plan: MergePlan, out: OutputPlan, atomic: AtomicOutput | BaseException | None,
               meta: Mapping[str, str], *,
               progress: Callable[[int], None] | None, finish: Callable[[], object] | None,
               t0: float) -> tuple[MergeStats, list[WorkerReport], object]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    _check_same_plan(plan)
    shares = split_tensors(plan, out, world)
    # Rank 0 creates the files; every rank learns where its tensors go (or that rank 0 could not create them).

    def create() -> dict[str, Place]:
        if isinstance(atomic, BaseException):  # rank 0 could not open the output
            raise atomic
        check_resources(plan, out, world, local=False)
        return presize_output(out, atomic, meta)

    places, err = _rank_outcome(create) if rank == 0 else (None, None)
    places_or_err = _broadcast((places, _portable(err)))
    places, (ok, why) = places_or_err
    if not ok:
        _raise_first_failure([(False, why)], world)
    alarm = _Alarm(rank, world)
    report, err = _rank_outcome(lambda: _run_share(plan, shares[rank], places, rank, alarm.watch(progress)))
    alarm.close(failed=err is not None)
    outcomes = _gather((report, _portable(err)))
    failed = [(ok, e) for _, (ok, e) in outcomes]
    if not all(ok for ok, _ in failed):
        _raise_first_failure(failed, world, own=err)
    reports = [r for r, _ in outcomes]
    result, err = _rank_outcome(finish) if rank == 0 and finish is not None else (None, None)
    result, (ok, why) = _broadcast((result, _portable(err)))
    if not ok:
        if rank == 0:
            raise err
        _raise_first_failure([(False, why)], world)
    stats = _summed(reports, time.perf_counter() - t0)
    return stats, reports, result


def describe_reports(reports: Sequence[WorkerReport]) -> str:
    """``2 processes: 0: 12 tensors, 1.2 GB read, 3.4s, peak 310 MB; ...``: one phrase for a benchmark or a log."""
    return f"{len(reports)} processes: " + "; ".join(
        f"{r.rank}: {r.tensors} tensors, {r.read_bytes / 1e9:.2f} GB read, {r.seconds:.1f}s, peak "
        f"{r.peak_rss_bytes / 2**20:.0f} MiB" for r in reports)

