"""The copier: moves extents from a source NBD export to a target NBD export.

Why this shape (design.md, facts): on these machines a short Python libnbd loop that asks for
block status first, sends zero extents as NBD zero requests, keeps many 1 MiB reads in flight
through reused buffers and issues each write as soon as its read completes beat nbdcopy into
a fresh qcow2 behind qemu-nbd. Python is not the limit; the request pattern is.

One thread drives two libnbd handles (source, target) with ``poll`` on both sockets, the
way nbdcopy's multi-thread-copying loop does, but single-threaded: one native handle per
thread (style.md). Completion callbacks only record what finished; the loop reacts.

Durability contract: an extent is reported to the ``Journal`` only after a target flush that
was issued after its write completed. A crash can lose unflushed writes; it can never make
the journal claim data that is not on disk.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import nbd

from appliance.datapath import extents as ex
from appliance.datapath.errors import (
    SourceReadError,
    SourceUnavailable,
    TargetFull,
    TargetWriteError,
    WriterError,
)
from appliance.datapath.throttle import Throttle
from appliance.errors import Cancelled
from appliance.sources.base import Extent
from appliance.units import MiB

log = logging.getLogger(__name__)

REQUEST_SIZE = 1 * MiB  # measured here: 1 MiB beat 256 KiB, 2, 4 and 8 MiB requests into qcow2
MAX_IN_FLIGHT = 32  # measured here: 32-64 x 1 MiB beat 16 into qcow2 behind qemu-nbd
FLUSH_EVERY = 256 * MiB  # bytes written between journal flushes: bounds re-copy after a crash
FLUSH_INTERVAL_S = 10.0  # ... and at most this long between them on a slow link
# errno values that no retry will fix: a bug or a request the server can never serve.
PERMANENT_ERRNOS = frozenset(
    {errno.EINVAL, errno.EOVERFLOW, errno.ENOTSUP, errno.EPERM, errno.EROFS, errno.EFBIG}
)
DISCONNECT_ERRNOS = frozenset(
    {
        errno.ENOTCONN,
        errno.ESHUTDOWN,
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
    }
)


class Journal(Protocol):
    """Told about extents that are durable on the target (after a covering flush).

    The daemon persists each call (e.g. a row in SQLite); after a crash it passes the rows
    back as ``resume_from`` so the copier skips them.
    """

    def done(self, disk_key: str, offset: int, length: int) -> None: ...


class ProgressSink(Protocol):
    """What the copier reports progress to (appliance.daemon.jobs.Progress fits)."""

    def set_total(self, total: int) -> None: ...

    def update(self, n: int) -> None: ...

    def set_phase(self, phase: str, **extra: Any) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    # No completion at all for this long while requests are in flight = stalled: drop the
    # connection and reconnect. Measured on silence, not per request, so a slow link with
    # many requests queued behind each other never times out falsely (reliability row 5).
    request_timeout: float = 60.0
    # Transient faults (EIO, connection loss, stalls) are retried for this long counted from
    # the first failure of a request (or the loss of the connection); then the sync fails.
    retry_window: float = 600.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    connect_timeout: float = 30.0


@dataclass
class CopyStats:
    bytes_read: int = 0  # payload read from the source, retries included (amplification)
    bytes_written: int = 0  # payload written to the target
    bytes_zeroed: int = 0  # covered by zero requests (or skipped on a zero target)
    bytes_unchanged: int = 0  # compare mode: read, hash equal, not written
    bytes_skipped_resume: int = 0  # done before, per the journal
    requests: int = 0
    retries: int = 0
    reconnects: int = 0
    stalls: int = 0
    flushes: int = 0
    elapsed_s: float = 0.0
    request_size: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BlockHasher(Protocol):
    """Compare mode and manifest building (appliance.datapath.hashing.ManifestBuilder)."""

    block_size: int

    def unchanged(self, offset: int, data: bytes) -> bool:
        """Record the hash of this block; True when it equals the previous point's."""
        ...

    def zero(self, offset: int, length: int) -> None: ...


class _Req:
    __slots__ = ("attempts", "buf", "first_fail", "length", "offset", "t_issue", "zero")

    def __init__(self, offset: int, length: int, zero: bool) -> None:
        self.offset = offset
        self.length = length
        self.zero = zero
        self.buf: Any = None
        self.attempts = 0
        self.first_fail = 0.0
        self.t_issue = 0.0


def _err_of(e: BaseException) -> int:
    n = getattr(e, "errnum", None)  # nbd.Error: errnum is the int, errno its name
    return int(n) if isinstance(n, int) and n else errno.EIO


def connect(
    uri: str, *, name: str = "ferryman", contexts: Sequence[str] = (), timeout: float = 30.0
) -> Any:
    """Open a libnbd handle to uri, waiting at most timeout for the handshake."""
    h = nbd.NBD()
    h.set_handle_name(name)
    h.set_pread_initialize(False)  # we check every read's status; skip the memset
    # URIs come only from sources an admin registered: let them name a TLS PSK or
    # certificate file (nbds://host/?tls-psk-file=...). nbds:// makes TLS required.
    h.set_uri_allow_local_file(True)
    for c in contexts:
        h.add_meta_context(c)
    h.aio_connect_uri(uri)
    end = time.monotonic() + timeout
    while h.aio_is_connecting():
        left = end - time.monotonic()
        if left <= 0:
            raise nbd.Error(f"timed out connecting to {uri}", errno.ETIMEDOUT)
        h.poll(int(min(left, 1.0) * 1000) or 1)
    if not h.aio_is_ready():
        raise nbd.Error(f"could not connect to {uri}", errno.ECONNREFUSED)
    return h


class Copier:
    """Copy extents of one disk from ``source_uri`` to ``target_uri``.

    ``progress``, ``cancel``, ``throttle`` and ``journal`` come from outside (the job).
    ``target_is_zero``: the target reads as zeroes where not written (a new base image
    without backing), so zero extents need no request at all.
    """

    def __init__(
        self,
        *,
        disk_key: str,
        source_uri: str,
        target_uri: str,
        progress: ProgressSink | None = None,
        cancel: threading.Event | None = None,
        throttle: Throttle | None = None,
        journal: Journal | None = None,
        retry: RetryPolicy | None = None,
        request_size: int = REQUEST_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
        flush_every: int = FLUSH_EVERY,
        flush_interval: float = FLUSH_INTERVAL_S,
        target_is_zero: bool = False,
        hasher: BlockHasher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.disk = disk_key
        self.source_uri = source_uri
        self.target_uri = target_uri
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.throttle = throttle
        self.journal = journal
        self.retry = retry or RetryPolicy()
        self.request_size = request_size
        self.max_in_flight = max_in_flight
        self.flush_every = flush_every
        self.flush_interval = flush_interval
        self.target_is_zero = target_is_zero
        self.hasher = hasher
        self.clock = clock
        self.stats = CopyStats()
        self._src: Any = None
        self._dst: Any = None
        self._events: list[tuple[str, _Req, int]] = []
        self._pool: dict[int, list[Any]] = {}
        self._src_inflight: dict[int, _Req] = {}
        self._dst_inflight: dict[int, _Req] = {}
        self._ids = itertools.count()
        self._unflushed: list[tuple[int, int]] = []
        self._unflushed_bytes = 0
        self._flushing: list[tuple[int, int]] | None = None
        self._flush_err = 0
        self._last_flush = 0.0
        self._last_src_done = 0.0
        self._failure: BaseException | None = None
        self._trouble_since: float | None = None  # first stall/disconnect without progress

    # -- public --------------------------------------------------------------------------

    def copy(
        self, extents: Iterable[Extent], resume_from: Iterable[tuple[int, int]] = ()
    ) -> CopyStats:
        t0 = self.clock()
        todo = list(extents)
        done = list(resume_from)
        if done:
            before = ex.total(todo)
            todo = ex.subtract(todo, done)
            self.stats.bytes_skipped_resume = before - ex.total(todo)
        try:
            self._src = self._connect_source()
            self._dst = self._connect_target()
            self._setup_sizes()
            if self.hasher is not None:
                todo = ex.snap_to_blocks(todo, self.request_size, self.source_size)
            reqs = deque(
                _Req(e.offset, e.length, e.zero)
                for e in ex.split(todo, self.request_size, align=self._align)
            )
            if self.progress is not None:
                self.progress.set_total(ex.total(todo))
                self.progress.set_phase("copying", disk=self.disk)
            self._run(reqs)
        finally:
            self._src = None
            self._dst = None
            self._pool.clear()
            self.stats.elapsed_s = self.clock() - t0
        return self.stats

    # -- set-up --------------------------------------------------------------------------

    def _connect_source(self) -> Any:
        try:
            return connect(
                self.source_uri, name=f"src-{self.disk}", timeout=self.retry.connect_timeout
            )
        except nbd.Error as e:
            raise SourceUnavailable(
                self.disk, 0, f"cannot connect to {self.source_uri}: {e.string}"
            ) from e

    def _connect_target(self) -> Any:
        try:
            return connect(self.target_uri, name=f"dst-{self.disk}", timeout=30.0)
        except nbd.Error as e:
            raise WriterError(
                f"disk {self.disk}: cannot connect to the writer at {self.target_uri}: {e.string}",
                hint="the local qemu-nbd did not start; see the daemon log",
            ) from e

    def _setup_sizes(self) -> None:
        src_size = self._src.get_size()
        dst_size = self._dst.get_size()
        if dst_size < src_size:
            raise WriterError(
                f"disk {self.disk}: the restore point is {dst_size} bytes but the source "
                f"is {src_size}",
                hint="the source disk grew: a resize of the chain is needed before syncing",
            )
        if self._dst.is_read_only():
            raise WriterError(
                f"disk {self.disk}: the writer export is read-only",
                hint="this is a bug: report it with the daemon log",
            )
        self.source_size = src_size
        maxes = [ex.DEFAULT_MAX_REQUEST]
        mins = [1]
        for h in (self._src, self._dst):
            mx = h.get_block_size(nbd.SIZE_MAXIMUM)
            mn = h.get_block_size(nbd.SIZE_MINIMUM)
            if mx:
                maxes.append(mx)
            if mn:
                mins.append(mn)
        self._align = max(mins)
        size = min([self.request_size, *maxes])
        size -= size % self._align
        if self.hasher is not None:
            if self.hasher.block_size > size or self.hasher.block_size % self._align:
                raise WriterError(
                    f"disk {self.disk}: hash block {self.hasher.block_size} does not fit "
                    f"the server's request limit {size}",
                    hint="use a full copy",
                )
            size = self.hasher.block_size
            self._align = size
        self.request_size = self.stats.request_size = size
        self._can_zero = bool(self._dst.can_zero())

    # -- the loop ------------------------------------------------------------------------

    def _run(self, reqs: deque[_Req]) -> None:
        retry_heap: list[tuple[float, int, _Req]] = []
        self._last_flush = self._last_src_done = self.clock()
        stopping = False
        while True:
            now = self.clock()
            if (self.cancel.is_set() or self._failure) and not stopping:
                stopping = True
                reqs.clear()
                retry_heap.clear()
            while retry_heap and retry_heap[0][0] <= now:
                reqs.appendleft(heapq.heappop(retry_heap)[2])
            wait = 1.0
            if retry_heap:
                wait = min(wait, max(0.0, retry_heap[0][0] - now))
            wait = min(wait, self._issue(reqs))
            idle = not reqs and not retry_heap and not self._src_inflight and not self._dst_inflight
            if (
                self._flushing is None
                and self._unflushed
                and (
                    idle
                    or self._unflushed_bytes >= self.flush_every
                    or now - self._last_flush >= self.flush_interval
                )
            ):
                self._issue_flush()
            if idle and self._flushing is None and not self._unflushed:
                break
            self._poll(wait)
            self._process(reqs, retry_heap)
            self._check_stall(reqs)
        if self._failure is not None:
            raise self._failure
        if self.cancel.is_set():
            raise Cancelled(f"disk {self.disk}: copy cancelled; what was flushed is in the journal")

    def _buffer(self, n: int) -> Any:
        free = self._pool.get(n)
        return free.pop() if free else nbd.Buffer(n)

    def _release(self, buf: Any) -> None:
        if buf is not None and buf.size() == self.request_size:
            self._pool.setdefault(buf.size(), []).append(buf)

    def _issue(self, reqs: deque[_Req]) -> float:
        """Issue requests while there is room; returns how long the throttle wants us to wait."""
        while reqs and len(self._src_inflight) + len(self._dst_inflight) < self.max_in_flight:
            r = reqs[0]
            if r.zero:
                reqs.popleft()
                self._write_zero(r)
                continue
            if self.throttle is not None:
                w = self.throttle.reserve(r.length)
                if w > 0:
                    return w
            reqs.popleft()
            r.buf = self._buffer(r.length)
            r.t_issue = self.clock()
            rid = next(self._ids)
            self._src_inflight[rid] = r
            try:
                self._src.aio_pread(r.buf, r.offset, self._cb("read", rid, r))
            except nbd.Error as e:
                # The handle refused the request: most often the connection is gone.
                del self._src_inflight[rid]
                err = _err_of(e)
                if self._src.aio_is_dead() or self._src.aio_is_closed():
                    err = errno.ENOTCONN
                self._events.append(("read", r, err))
            self.stats.requests += 1
        return 1.0

    def _cb(self, kind: str, rid: int, r: _Req) -> Callable[[Any], int]:
        def done(err: Any) -> int:
            table = self._src_inflight if kind == "read" else self._dst_inflight
            if table.pop(rid, None) is None:
                return 1  # abandoned by a reconnect: already re-queued
            self._events.append((kind, r, int(err.value)))
            return 1

        return done

    def _write_zero(self, r: _Req) -> None:
        if self.hasher is not None:
            self.hasher.zero(r.offset, r.length)
        self._send_zero(r)

    def _send_zero(self, r: _Req) -> None:
        if self.target_is_zero:
            self.stats.bytes_zeroed += r.length
            self._written(r)
            return
        if not self._can_zero:
            # Target without WRITE_ZEROES: write zero data (rare; qemu-nbd always can).
            r.buf = nbd.Buffer.from_bytearray(bytearray(r.length))
            self._submit_write(r, zero=False)
            return
        self._submit_write(r, zero=True)

    def _submit_write(self, r: _Req, *, zero: bool) -> None:
        rid = next(self._ids)
        self._dst_inflight[rid] = r
        r.t_issue = self.clock()
        try:
            if zero:
                self._dst.aio_zero(r.length, r.offset, self._cb("zero", rid, r))
            else:
                self._dst.aio_pwrite(r.buf, r.offset, self._cb("write", rid, r))
        except nbd.Error as e:
            del self._dst_inflight[rid]
            self._events.append(("zero" if zero else "write", r, _err_of(e) or errno.ENOTCONN))

    def _issue_flush(self) -> None:
        batch = self._unflushed
        self._unflushed = []
        self._unflushed_bytes = 0
        self._flushing = batch
        self._last_flush = self.clock()

        def done(err: Any) -> int:
            self._flush_err = int(err.value)
            self._events.append(("flush", _Req(0, 0, False), int(err.value)))
            return 1

        try:
            self._dst.aio_flush(done)
        except nbd.Error as e:
            self._events.append(("flush", _Req(0, 0, False), _err_of(e) or errno.ENOTCONN))

    def _poll(self, timeout: float) -> None:
        if self._events:
            return
        p = select.poll()
        handles = []
        for h in (self._src, self._dst):
            if h is None:
                continue
            d = h.aio_get_direction()
            mask = 0
            if d & nbd.AIO_DIRECTION_READ:
                mask |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                mask |= select.POLLOUT
            if mask:
                fd = h.aio_get_fd()
                p.register(fd, mask)
                handles.append((fd, h))
        if not handles:
            time.sleep(min(timeout, 0.05))
            return
        for fd, ev in p.poll(max(1, int(timeout * 1000))):
            h = next(hh for f, hh in handles if f == fd)
            try:
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                elif ev & select.POLLOUT:
                    h.aio_notify_write()
            except nbd.Error as e:
                log.debug("disk %s: notify failed: %s", self.disk, e)

    def _process(self, reqs: deque[_Req], retry_heap: list[tuple[float, int, _Req]]) -> None:
        events, self._events = self._events, []
        for kind, r, err in events:
            if kind == "read":
                self._read_done(r, err, reqs, retry_heap)
            elif kind == "flush":
                self._flush_done(err)
            else:
                self._write_done(kind, r, err)
        if (
            self._src is not None
            and (self._src.aio_is_dead() or self._src.aio_is_closed())
            and self._failure is None
        ):
            self._reconnect(reqs, "the source connection died")

    def _read_done(
        self, r: _Req, err: int, reqs: deque[_Req], retry_heap: list[tuple[float, int, _Req]]
    ) -> None:
        now = self.clock()
        if err == 0:
            self._last_src_done = now
            self._trouble_since = None
            self.stats.bytes_read += r.length
            if self._failure is not None:
                self._release(r.buf)
                return
            if self.hasher is not None:
                data = bytes(r.buf.to_bytearray())
                if self.hasher.unchanged(r.offset, data):
                    self.stats.bytes_unchanged += r.length
                    self._release(r.buf)
                    r.buf = None
                    self._written(r)
                    return
            if r.buf.is_zero():
                # Data that reads as zeroes (no block status, or a thick source): a zero
                # request instead of a payload, as nbdcopy does.
                self._release(r.buf)
                r.buf = None
                self._send_zero(r)
                return
            self._submit_write(r, zero=False)
            return
        # A failed read: the buffer goes back, the request is retried or the copy fails.
        self._release(r.buf)
        r.buf = None
        if self._failure is not None or self.cancel.is_set():
            return
        if r.attempts == 0:
            r.first_fail = now
        r.attempts += 1
        if err in DISCONNECT_ERRNOS or (self._src is not None and self._src.aio_is_dead()):
            reqs.appendleft(r)
            return
        if err in PERMANENT_ERRNOS or now - r.first_fail >= self.retry.retry_window:
            self._failure = SourceReadError(self.disk, r.offset, err, attempts=r.attempts)
            return
        self.stats.retries += 1
        delay = min(self.retry.backoff_max, self.retry.backoff_initial * 2 ** (r.attempts - 1))
        log.info(
            "disk %s: read at %d failed (%s), retry %d in %.1fs",
            self.disk,
            r.offset,
            err,
            r.attempts,
            delay,
        )
        heapq.heappush(retry_heap, (now + delay, next(self._ids), r))

    def _write_done(self, kind: str, r: _Req, err: int) -> None:
        if kind == "write":
            self._release(r.buf)
            r.buf = None
        if err == 0:
            if kind == "write":
                self.stats.bytes_written += r.length
            else:
                self.stats.bytes_zeroed += r.length
            self._written(r)
            return
        if self._failure is not None:
            return
        if err in (errno.ENOSPC, errno.EDQUOT):
            self._failure = TargetFull(self.disk, r.offset)
        elif err in DISCONNECT_ERRNOS or self._dst.aio_is_dead() or self._dst.aio_is_closed():
            self._failure = WriterError(
                f"disk {self.disk}: the writer (qemu-nbd) went away at offset {r.offset}",
                hint="unflushed writes are not in the journal; the partial restore point "
                "is resumed or discarded on the next sync",
            )
            self._dst_inflight.clear()
            self._unflushed.clear()
        else:
            self._failure = TargetWriteError(self.disk, r.offset, err)

    def _written(self, r: _Req) -> None:
        self._unflushed.append((r.offset, r.length))
        self._unflushed_bytes += r.length
        if self.progress is not None:
            self.progress.update(r.length)

    def _flush_done(self, err: int) -> None:
        batch, self._flushing = self._flushing or [], None
        if err != 0:
            if self._failure is None:
                self._failure = (
                    TargetFull(self.disk, 0)
                    if err == errno.ENOSPC
                    else WriterError(
                        f"disk {self.disk}: flushing the restore point failed ({err})",
                        hint="check the volume store; sync again",
                    )
                )
            self._unflushed.clear()
            return
        self.stats.flushes += 1
        if self.journal is not None:
            for off, n in ex.coalesce_ranges(batch):
                self.journal.done(self.disk, off, n)

    # -- faults --------------------------------------------------------------------------

    def _check_stall(self, reqs: deque[_Req]) -> None:
        if self._failure is not None:
            return
        now = self.clock()
        t = self.retry.request_timeout
        if self._dst_inflight:
            oldest_w = min(r.t_issue for r in self._dst_inflight.values())
            if now - oldest_w > max(t, 60.0):
                self._failure = WriterError(
                    f"disk {self.disk}: the writer (qemu-nbd) did not answer for "
                    f"{now - oldest_w:.0f}s",
                    hint="check the volume store's disk; sync again",
                )
                self._dst_inflight.clear()
                return
        if not self._src_inflight:
            return
        oldest = min(r.t_issue for r in self._src_inflight.values())
        if now - oldest > t and now - self._last_src_done > t:
            self.stats.stalls += 1
            self._reconnect(reqs, f"no reply from the source for {t:.0f}s")

    def _drain_target(self) -> None:
        """Finish target writes and flush them, so the journal is current while we wait."""
        while (
            self._dst_inflight or self._unflushed or self._flushing is not None
        ) and self._failure is None:
            if self._flushing is None and not self._dst_inflight and self._unflushed:
                self._issue_flush()
            self._poll(1.0)
            events, self._events = self._events, []
            keep = []
            for kind, r, err in events:
                if kind == "read":
                    keep.append((kind, r, err))
                elif kind == "flush":
                    self._flush_done(err)
                else:
                    self._write_done(kind, r, err)
            self._events = keep + self._events
            if keep:
                break

    def _reconnect(self, reqs: deque[_Req], why: str) -> None:
        """Drop the source connection, requeue what was in flight, connect again."""
        lost = list(self._src_inflight.values())
        self._src_inflight.clear()
        pending_reads = [r for k, r, _ in self._events if k == "read"]
        self._events = [e for e in self._events if e[0] != "read"]
        self._src = None  # closes the socket; in-flight requests are abandoned
        first = min([r.offset for r in lost + pending_reads], default=0)
        for r in sorted(lost + pending_reads, key=lambda x: x.offset, reverse=True):
            r.buf = None
            reqs.appendleft(r)
        log.warning("disk %s: %s; reconnecting (%d requests re-queued)", self.disk, why, len(lost))
        if self.progress is not None:
            self.progress.set_phase("stalled", disk=self.disk, stalled_reason=why)
        self._drain_target()
        if self._failure is not None:
            return
        if self._trouble_since is None:
            self._trouble_since = self.clock()
        start = self._trouble_since
        delay = self.retry.backoff_initial
        while True:
            if self.cancel.is_set():
                return
            if self.clock() - start >= self.retry.retry_window:
                self._failure = SourceUnavailable(
                    self.disk, first, f"{why}; no progress for {self.retry.retry_window:.0f}s"
                )
                return
            try:
                h = connect(
                    self.source_uri, name=f"src-{self.disk}", timeout=self.retry.connect_timeout
                )
                if h.get_size() != self.source_size:
                    self._failure = SourceUnavailable(
                        self.disk,
                        first,
                        f"the export changed size on reconnect "
                        f"({self.source_size} -> {h.get_size()}): not the same snapshot",
                    )
                    return
                self._src = h
                break
            except nbd.Error as e:
                log.info("disk %s: reconnect failed: %s", self.disk, e.string)
                if self.clock() - start >= self.retry.retry_window:
                    self._failure = SourceUnavailable(
                        self.disk,
                        first,
                        f"{why}; reconnecting failed for "
                        f"{self.retry.retry_window:.0f}s: {e.string}",
                    )
                    return
                self.cancel.wait(delay)
                delay = min(self.retry.backoff_max, delay * 2)
        self.stats.reconnects += 1
        self._last_src_done = self.clock()
        if self.progress is not None:
            self.progress.set_phase("copying", disk=self.disk, stalled_reason="")
