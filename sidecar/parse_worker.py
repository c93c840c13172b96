"""The parse worker: provider answers turned into bar rows in a second process.

At a few thousand symbols, turning the answers of a cycle into bars is a third of
the daemon's CPU, all on its one event-loop thread. The fetch stays in the daemon
(HTTP, budgets, breakers, planner); the body goes down a pipe to a child process
(``python -m sidecar.parse_worker``), which parses it on the other core and sends
back only what the daemon needs: the rows that are new or changed, and ids for the
closed rows it already sent (see :class:`sidecar.sources.twelvedata.ClosedRows`).

Protocol: frames of a 4-byte big-endian length and a :mod:`marshal` payload (the
fastest encoding of tuples of numbers and strings; both ends run the same Python).
The worker says ``("ready", pid)`` once, then answers each ``(job, kind, request)``
with ``(job, OK, answer)`` or ``(job, REFUSED, error)`` (a :class:`ProviderError`
for the whole request). Anything else it raises ends the process.

The worker exits when its stdin closes (the daemon stopped or died) and, on Linux,
when the daemon dies (``PR_SET_PDEATHSIG``), so it never outlives the daemon. A
worker that dies, hangs or answers something that does not fit is a degradation:
its jobs in flight return ``None`` and the caller parses in-process (the bytes are
here and parsing them is correct; failing the chunk would blame the provider), and
the worker is restarted with back-off. One log line per state change.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import marshal
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

from sidecar.bar import Bar
from sidecar.errors import ErrorClass, ProviderError
from sidecar.gc_tuning import settle_gc

if TYPE_CHECKING:
    from sidecar.sources.base import Source

log = logging.getLogger("sidecar.parse_worker")

T = TypeVar("T")
FRAME = struct.Struct(">I")
OK, REFUSED = 0, 1
#: ``SIDECAR_PARSE_PROCESS=auto`` starts the worker from this many symbols (docs/operations.md).
AUTO_MIN_SYMBOLS = 500
MODES = ("auto", "on", "off")
#: No answer to any job in this long means the worker hangs (a 500-symbol batch takes ~3-6 ms).
JOB_TIMEOUT_S = 0.5
#: Restart delays after consecutive deaths; a worker that lived STABLE_S starts over.
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0
START_TIMEOUT_S = 10.0
#: What the channels to and from the worker are asked to hold: a whole batch's body.
CHANNEL_BYTES = 1 << 20
#: Smaller pipe capacities tried when the system allows less (``/proc/sys/fs/pipe-max-size``).
_CHANNEL_FALLBACKS = (512 << 10, 256 << 10)
#: What each kind of job is parsed by in the worker: ``module:class`` (a callable per request).
PARSERS = {"twelvedata": "sidecar.sources.twelvedata:WorkerParser"}
_PR_SET_PDEATHSIG = 1
#: The environment the worker inherits (plus ``LC_*``): no keys, no Redis URL.
_CHILD_ENV = ("PATH", "LANG", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "TMPDIR")
_CLK_TCK = os.sysconf("SC_CLK_TCK")

State = Literal["stopped", "starting", "alive", "down", "closed"]
#: A :class:`ProviderError` as it crosses the pipe: class, message, retry_after, source.
WireError = tuple[str, str, float | None, str]


class WorkerLost(Exception):
    """The worker cannot answer this job (it died, hangs, or is stopping)."""


def error_to_wire(err: ProviderError) -> WireError:
    """``err`` as plain values for the pipe."""
    return (err.error_class, str(err), err.retry_after, err.source)


def error_from_wire(wire: Sequence[Any]) -> ProviderError:
    """The :class:`ProviderError` :func:`error_to_wire` described (same class and message)."""
    error_class: ErrorClass = wire[0]
    err = ProviderError(error_class, "", source=wire[3], retry_after=wire[2])
    err.args = (wire[1],)
    return err


def wanted(mode: str, symbols: int) -> bool:
    """Whether ``SIDECAR_PARSE_PROCESS`` = ``mode`` runs a parse worker for ``symbols`` symbols."""
    return mode == "on" or (mode == "auto" and symbols >= AUTO_MIN_SYMBOLS)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


async def _read_frame(stream: asyncio.StreamReader) -> Any:
    (size,) = FRAME.unpack(await stream.readexactly(FRAME.size))
    return marshal.loads(await stream.readexactly(size))


class ParseWorker:
    """The daemon's handle on its parse worker process: start, jobs, restarts, stop.

    :meth:`run` sends one job and returns the caller's ``decode`` of the answer, run
    as soon as the answer arrives (also when the caller gave up waiting, so state
    mirrored from the worker, :meth:`book`, never misses an answer).
    """

    __slots__ = ("_books", "_clock", "_closing", "_failures", "_jobs", "_next_job", "_proc",
                 "_reader", "_restart_task", "_sleep", "_started_at", "backoff_s", "fallbacks",
                 "job_timeout_s", "jobs", "last_error", "pid", "queued_windows", "restarts", "state")

    def __init__(self, *, job_timeout_s: float = JOB_TIMEOUT_S,
                 backoff_s: Sequence[float] = BACKOFF_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job_timeout_s = job_timeout_s
        self.backoff_s = tuple(backoff_s)
        self._sleep = sleep
        self._clock = clock
        self.state: State = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        #: Jobs answered, and jobs the caller had to parse in-process.
        self.jobs = 0
        self.fallbacks = 0
        #: Hang windows a job outlasted while the worker answered others: a queue, not a hang.
        self.queued_windows = 0
        self.last_error: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._jobs: dict[int, tuple[asyncio.Future[Any], Callable[[Any], Any]]] = {}
        self._next_job = 0
        self._books: dict[str, dict[int, Bar]] = {}
        self._failures = 0
        self._started_at = 0.0
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> bool:
        """Start the process and wait until it is ready; ``False`` (restart later) if not."""
        self._closing = False
        return await self._spawn()

    async def close(self) -> None:
        """Stop the worker (close its stdin, wait, kill if it does not go) and any restart."""
        self._closing = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
        proc, self._proc = self._proc, None
        self._fail_jobs("the parse worker is stopping")
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.state != "closed":
            log.info("parse worker stopped", extra=self.status())
        self.state, self.pid = "closed", None

    def book(self, kind: str) -> dict[int, Bar]:
        """The bars built from ``kind``'s answers by id, for this worker's life (see ClosedRows)."""
        book = self._books.get(kind)
        if book is None:
            book = self._books[kind] = {}
        return book

    def status(self) -> dict[str, Any]:
        """Facts for ``/health`` and ``/metrics``."""
        return {"state": self.state, "alive": self.state == "alive", "pid": self.pid,
                "restarts": self.restarts, "jobs": self.jobs, "in_flight": len(self._jobs),
                "fallbacks": self.fallbacks, "last_error": self.last_error,
                "cpu_s": None if self.pid is None else process_cpu_s(self.pid)}

    # -- jobs -----------------------------------------------------------------------
    async def run(self, kind: str, request: Any, decode: Callable[[Any], T]) -> T | None:
        """``decode(answer)`` of the worker's answer to ``request``, or ``None`` when the
        worker cannot answer it (not running, died, hung): then the caller parses.

        A :class:`ProviderError` the parse raised for the whole request is raised here.
        """
        proc = self._proc
        if self.state != "alive" or proc is None or proc.stdin is None:
            self.fallbacks += 1
            return None
        job = self._next_job
        self._next_job += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs[job] = (future, decode)
        payload = marshal.dumps((job, kind, request))
        try:
            # No drain(): it waits for the whole pipe buffer, i.e. for every job queued
            # behind this one, so all answers of a cycle would be taken at once at the end.
            # Jobs in flight bound the buffer (one answer body each); a hang times out.
            proc.stdin.write(FRAME.pack(len(payload)))
            proc.stdin.write(payload)
            # Hung means no answer to any job for a whole window: a job queued behind
            # others (ten per cycle at 5,000 symbols) waits for them, on a busy machine
            # longer than one window, while the worker is answering all along.
            answered = self.jobs
            while True:
                try:
                    result: T = await asyncio.wait_for(asyncio.shield(future), self.job_timeout_s)
                    return result
                except TimeoutError:
                    if self.jobs == answered or proc is not self._proc:
                        raise
                    answered = self.jobs
                    self.queued_windows += 1
        except TimeoutError:
            future.cancel()  # shielded above: nobody awaits it any more
            if proc is self._proc:
                self._lost(f"hung: no answer within {self.job_timeout_s} s")
        except WorkerLost:
            pass
        except (ConnectionError, RuntimeError) as exc:  # the pipe closed under us
            if proc is self._proc:
                self._lost(f"pipe closed: {exc}")
        self.fallbacks += 1
        return None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Hand every answer to its job's decode; the end of the pipe means the worker died."""
        assert proc.stdout is not None
        try:
            while True:
                job, status, answer = await _read_frame(proc.stdout)
                entry = self._jobs.pop(job, None)
                if entry is None:
                    continue
                future, decode = entry
                self.jobs += 1
                if status != OK:
                    if not future.done():
                        future.set_exception(error_from_wire(answer))
                    continue
                try:
                    value = decode(answer)
                except Exception as exc:  # an answer that does not fit our mirror: start over
                    if not future.done():
                        future.set_exception(WorkerLost("bad answer"))
                    if proc is self._proc:
                        self._lost(f"answer did not fit: {exc!r}")
                    return
                if not future.done():
                    future.set_result(value)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, EOFError, TypeError) as exc:
            if proc is self._proc:
                self._lost("exited" if isinstance(exc, asyncio.IncompleteReadError)
                           else f"unreadable answer: {exc!r}")

    # -- failure and restart ----------------------------------------------------------
    async def _spawn(self) -> bool:
        self.state = "starting"
        self._books.clear()  # ids are per worker life
        # Only what Python needs: the worker has no use for settings, and none for keys.
        env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV or k.startswith("LC_")}
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar.parse_worker", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        except OSError as exc:
            self._lost(f"cannot start: {exc}")
            return False
        self._proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        channel = proc.stdin.get_extra_info("pipe") or proc.stdin.get_extra_info("socket")
        if channel is not None:
            widen(channel.fileno())
        try:
            hello = await asyncio.wait_for(_read_frame(proc.stdout), START_TIMEOUT_S)
            if not (isinstance(hello, tuple) and hello[0] == "ready"):
                raise ValueError(f"unexpected greeting {hello!r}")
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, EOFError) as exc:
            self._lost(f"did not start: {exc!r}")
            return False
        if self._closing:
            return False
        self.pid, self.state, self._started_at = proc.pid, "alive", self._clock()
        self._reader = asyncio.ensure_future(self._read(proc))
        log.info("parse worker started", extra={"pid": proc.pid, "restarts": self.restarts})
        return True

    def _fail_jobs(self, why: str) -> int:
        jobs = list(self._jobs.values())
        self._jobs.clear()
        for future, _decode in jobs:
            if not future.done():
                future.set_exception(WorkerLost(why))
        return len(jobs)

    def _lost(self, reason: str) -> None:
        """The worker cannot go on: fail its jobs (to in-process), kill it, restart later."""
        if self.state in ("down", "closed"):
            return
        proc, self._proc = self._proc, None
        pid, self.pid = self.pid, None
        self.state, self.last_error = "down", reason
        in_flight = self._fail_jobs(reason)
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        lived = self._clock() - self._started_at
        self._failures = 1 if lived >= STABLE_S else self._failures + 1
        delay = self.backoff_s[min(self._failures, len(self.backoff_s)) - 1]
        log.warning("parse worker lost: parsing in-process until it is back",
                    extra={"reason": reason, "pid": pid, "in_flight": in_flight,
                           "restart_in_s": delay})
        if not self._closing:
            self._restart_task = asyncio.ensure_future(self._restart(proc, delay))

    async def _restart(self, proc: asyncio.subprocess.Process | None, delay: float) -> None:
        if proc is not None:
            await proc.wait()  # reap it
        await self._sleep(delay)
        if not self._closing:
            self.restarts += 1
            await self._spawn()


async def start_for(sources: Sequence[Source], mode: str, symbols: int) -> ParseWorker | None:
    """Start a worker when ``mode`` wants one for ``symbols`` and a source can use it."""
    users = [s for s in sources if s.parse_kind is not None]
    if not users or not wanted(mode, symbols):
        return None
    worker = ParseWorker()
    await worker.start()  # if it cannot start, it is restarted later: in-process meanwhile
    for source in users:
        source.parse_worker = worker
    return worker


# -- the worker process ---------------------------------------------------------------
def widen(fd: int, size: int = CHANNEL_BYTES) -> int:
    """Let the pipe or socket ``fd`` hold ``size`` bytes (as much of it as the system
    allows: ``pipe-max-size``, ``wmem_max``); returns what it holds now (0: neither).

    With the defaults (64 KiB for a pipe, ~200 KiB for a Unix socket) a body of a few
    hundred KiB reaches the worker only as fast as the daemon's event loop comes round
    to write the rest, which it does not while it works on the previous answer."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) and hasattr(fcntl, "F_SETPIPE_SZ"):
        for want in (size, *_CHANNEL_FALLBACKS):
            try:
                return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)
            except OSError:
                continue
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, size)  # the kernel caps it silently
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        finally:
            sock.close()
    return 0


def _write_frame(out: BinaryIO, value: Any) -> None:
    payload = marshal.dumps(value)
    out.write(FRAME.pack(len(payload)))
    out.write(payload)
    out.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer jobs from ``inp`` on ``out`` until ``inp`` ends."""
    import importlib

    parsers: dict[str, Callable[[Any], Any]] = {}
    for kind, where in PARSERS.items():
        module, name = where.split(":")
        parsers[kind] = getattr(importlib.import_module(module), name)()
    settle_gc()  # as the daemon does: each answer's decoded JSON is large and acyclic
    _write_frame(out, ("ready", os.getpid()))
    while True:
        head = inp.read(FRAME.size)
        if len(head) < FRAME.size:
            return  # the daemon closed the pipe, or died
        (size,) = FRAME.unpack(head)
        payload = inp.read(size)
        if len(payload) < size:
            return
        job, kind, request = marshal.loads(payload)
        try:
            answer = (job, OK, parsers[kind](request))
        except ProviderError as err:
            answer = (job, REFUSED, error_to_wire(err))
        _write_frame(out, answer)


def main(argv: Sequence[str]) -> int:
    """``python -m sidecar.parse_worker PARENT_PID``: serve the daemon on stdin/stdout."""
    parent = int(argv[0]) if argv else os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the daemon died before the line above
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the daemon's to handle
    for fd in (0, 1):
        widen(fd)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the protocol
    serve(os.fdopen(0, "rb"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
