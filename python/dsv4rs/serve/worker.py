"""The engine loop: one thread owns the :class:`dsv4rs.LLM` (it is not thread-safe) and the event
loop talks to it through queues.

- :meth:`EngineWorker.submit` (event loop) admits a request if fewer than ``max_pending`` are in
  flight, else raises :class:`Overloaded` (the server's 429); the request goes to the engine
  thread's inbox. A request is in flight from ``submit`` until its HTTP handler calls
  :meth:`EngineWorker.release` (its response sent, or its client gone): queued, running, or still
  streaming to a slow client.
- The engine thread adds inbox requests, runs :meth:`LLM.step` while any request is unfinished
  (continuous batching: requests join and leave between steps) and hands each request's deltas to
  its :class:`Handle`'s asyncio queue (``call_soon_threadsafe``).
- :meth:`EngineWorker.cancel` (a client gone) aborts the request in the engine thread: its
  sequence's pages return to the cache between two steps, never during one.
- :meth:`EngineWorker.shutdown` refuses new requests, lets running ones finish for up to
  ``grace`` seconds, aborts the rest (between steps) and stops the thread; the cache is left
  consistent (every sequence released).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsv4rs.llm.outputs import Delta
from dsv4rs.llm.params import SamplingParams


class Overloaded(RuntimeError):
    """The request queue is full."""


class ShuttingDown(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass(eq=False)
class Handle:
    """One request as the event loop sees it: deltas (or an exception) arrive on ``queue``."""

    loop: asyncio.AbstractEventLoop
    ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    rid: int | None = None
    finished: bool = False
    released: bool = False

    def _put(self, item: Delta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody listens
            pass


class EngineWorker:
    """Runs an :class:`~dsv4rs.llm.LLM` on its own thread for an asyncio server.

    Args:
        llm: the model (only this worker's thread may touch it once started).
        max_pending: requests in flight at most; more raise :class:`Overloaded`.
    """

    def __init__(self, llm, max_pending: int = 64) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {max_pending}")
        self.llm, self.max_pending = llm, max_pending
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closing = False
        self._active: dict[int, Handle] = {}
        self._thread = threading.Thread(target=self._run, name="dsv4rs-engine", daemon=True)
        self.error: BaseException | None = None
        self._threads = torch.get_num_threads()  # the creating thread's setting, for the engine thread
        self.finished: collections.deque = collections.deque(maxlen=256)  # recent completions, newest last

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        self._thread.start()

    def submit(self, ids: Sequence[int], params: SamplingParams) -> Handle:
        """Queues a request (from the event loop's thread); its deltas arrive on the handle."""
        with self._lock:
            if self._closing or self.error is not None:
                raise ShuttingDown("the server is shutting down")
            if self._in_flight >= self.max_pending:
                raise Overloaded(f"the request queue is full ({self.max_pending} requests in flight)")
            self._in_flight += 1
        h = Handle(asyncio.get_running_loop(), list(ids), params)
        self._inbox.put(("add", h))
        return h

    @property
    def active(self) -> int:
        """Requests the engine thread has not finished."""
        return len(self._active) + self._inbox.qsize()

    def release(self, h: Handle) -> None:
        """The request's handler is done with it (once per handle; frees its place in flight)."""
        with self._lock:
            if not h.released:
                h.released = True
                self._in_flight -= 1

    def cancel(self, h: Handle) -> None:
        """Aborts a request whose client went away (any thread)."""
        if not h.finished:
            self._inbox.put(("abort", h))

    def shutdown(self, grace: float = 30.0) -> None:
        """Takes no new requests, waits up to ``grace`` seconds for the running ones, aborts the
        rest and stops the engine thread."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + grace
        while self._in_flight and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join()

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            while self._serve_once():
                pass
        except BaseException as e:  # the engine failed: fail every request, take no more
            self.error = e
            for h in list(self._active.values()):
                self._finish(h, RuntimeError(f"the engine failed: {e!r}"))
            self._active.clear()
            raise
        finally:
            for h in list(self._active.values()):  # stopped: abort what is left
                self.llm.abort(h.rid)
            while self._active:
                for d in self.llm.step():
                    self._deliver(d)

    def _serve_once(self) -> bool:
        """Handles the inbox, then one engine step; False once told to stop."""
        idle = not self.llm.has_unfinished()
        while True:
            try:
                cmd, h = self._inbox.get(timeout=0.1) if idle else self._inbox.get_nowait()
            except queue.Empty:
                break
            idle = False
            if cmd == "stop":
                return False
            if cmd == "add":
                try:
                    h.rid = self.llm.add_request(h.ids, h.params)
                    self._active[h.rid] = h
                except ValueError as e:
                    self._finish(h, e)
            elif cmd == "abort" and h.rid is not None and not h.finished:
                self.llm.abort(h.rid)
        if self.llm.has_unfinished():
            for d in self.llm.step():
                self._deliver(d)
        return True

    def _deliver(self, d: Delta) -> None:
        h = self._active.get(d.request_id)
        if h is None:
            return
        if d.finished:
            del self._active[d.request_id]
            self.finished.append(self.llm.completion(d.request_id))
            self._finish(h, d)
        else:
            h._put(d)

    def _finish(self, h: Handle, last: Delta | BaseException) -> None:
        h.finished = True
        h._put(last)
