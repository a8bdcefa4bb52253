"""The live KV-event sockets of every subscription drained on one native thread.

``kv_subscriber`` makes and configures each SUB socket and keeps every decision; with a
``NativeLiveReceiver`` it hands the socket to the thread (``kernels/kvrecvloop.h``) instead of
watching its descriptor on the event loop. The thread receives without the GIL and wakes the
loop once for all the messages that arrived since the last wake-up; a turn then queues each
message with its subscription and applies the queues, bounded in time as the Python path's
turns are, so that a burst cannot hold the ext_proc streams.

Why: at 1,000 subscriptions, pyzmq's receive of each batch's three frames, libzmq's EVENTS
asks and a loop wake-up per batch were about half of the ~47 us of CPU a batch cost on the
event loop (py-spy over ``kvsched bench scrape``).

The thread calls the libzmq that pyzmq loaded (the sockets are pyzmq's): its file is found
among the process's mappings. Where the native module is not built, or that library cannot be
found (not Linux, pyzmq on another backend), ``native_receiver_available`` says why and the
subscriptions use pyzmq on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

# The thread's name (kernels/kvrecvloop.h), for its CPU in /proc/self/task/*/comm.
RECEIVE_THREAD_NAME = "kvsched-kvrecv"
# Received bytes the thread may hold for the event loop before it stops receiving (ZMQ's own
# queues, RCVHWM messages per socket, hold what arrives meanwhile). The loop takes them all
# at each wake-up, into the per-publisher queues whose byte bounds decide what is dropped;
# this only caps what waits between two wake-ups.
DEFAULT_MAX_PENDING_BYTES = 8 * 1024 * 1024
# A turn applies queued messages until this much time has passed (the Python path's
# LIVE_BUDGET_NS), then leaves the rest for the loop's next turn.
TURN_BUDGET_NS = 1_000_000

# Queues one message (its frames) behind the subscription's waiting ones.
Receive = Callable[[list[bytes]], None]
# Applies queued messages until the deadline (perf_counter_ns); True when some still wait.
Apply = Callable[[int], bool]
# One live batch (seq, payload): applied at once when the turn may (its last argument) and
# nothing holds it back (True), or else queued (False).
ApplyNow = Callable[[int, bytes, bool], bool]


def libzmq_path() -> str | None:
    """The file of the libzmq pyzmq's backend loaded, from ``/proc/self/maps``; None when
    there is none to find or several that pyzmq's own directory does not tell apart."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {
                line.split(None, 5)[5].strip()
                for line in maps
                if "libzmq" in line and len(line.split(None, 5)) == 6
            }
    except OSError:
        return None
    paths = {path for path in paths if Path(path).name.startswith("libzmq")}
    if len(paths) == 1:
        return paths.pop()
    # A wheel's own copy (pyzmq.libs beside the zmq package) over any other loaded one.
    site = Path(zmq.__file__).resolve().parent.parent
    own = sorted(path for path in paths if Path(path).resolve().is_relative_to(site))
    return own[0] if len(own) == 1 else None


def native_receiver_available() -> tuple[bool, str]:
    """Whether the native receive thread can run here, and if not, why."""
    try:
        from scheduler._native import kvrecv  # noqa: F401
    except ImportError as exc:
        return False, f"native module not built ({exc})"
    if libzmq_path() is None:
        return False, "pyzmq's libzmq not found among the process's mappings"
    return True, "native"


@dataclass(slots=True)
class _Target:
    receive: Receive
    apply: Apply
    apply_now: ApplyNow
    queued: bool = False  # on the turn's list of targets with messages to apply
    removed: bool = False


class NativeLiveReceiver:
    """One native thread receiving the live SUB sockets handed to it; the event loop applies."""

    def __init__(self, *, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        from scheduler._native.kvrecv import KVReceiveLoop

        path = libzmq_path()
        if path is None:
            raise OSError("pyzmq's libzmq not found among the process's mappings")
        self._thread = KVReceiveLoop(path, max_pending_bytes)
        if self._thread.zmq_version != zmq.zmq_version_info():
            self._thread.close()
            raise OSError(
                f"libzmq at {path} is {self._thread.zmq_version}, pyzmq runs {zmq.zmq_version_info()}"
            )
        self._targets: dict[int, _Target] = {}
        self._next_id = 1
        self._with_messages: deque[_Target] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_turn: asyncio.Handle | None = None
        self.turns = 0

    @property
    def sockets(self) -> int:
        return len(self._targets)

    def stats(self) -> dict[str, int]:
        return {**self._thread.stats(), "sockets": len(self._targets), "turns": self.turns}

    def add(self, socket: zmq.Socket[Any], receive: Receive, apply: Apply, apply_now: ApplyNow) -> int:
        """Hand ``socket`` to the thread. Each of its messages is applied at once
        (``apply_now``) while the turn has time and none of its earlier ones waits, and is
        otherwise queued (``receive``) for ``apply`` to take on. The socket is the thread's
        until ``remove`` returns: do not use it meanwhile."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._thread.notify_fd)
            loop.add_reader(self._thread.notify_fd, self._notified)
            self._loop = loop
        target = self._next_id
        self._next_id += 1
        fd = int(socket.getsockopt(zmq.FD))
        self._targets[target] = _Target(receive, apply, apply_now)
        try:
            self._thread.add(target, socket.underlying, fd)
        except OSError:
            del self._targets[target]
            raise
        return target

    def remove(self, target: int) -> None:
        """Take the socket back (the thread no longer uses it once this returns); its messages
        not applied yet are dropped."""
        entry = self._targets.pop(target, None)
        if entry is not None:
            entry.removed = True
            self._thread.remove(target)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._thread.notify_fd)
        if self._next_turn is not None:
            self._next_turn.cancel()
            self._next_turn = None
        self._loop = None
        self._thread.close()
        self._targets.clear()
        self._with_messages.clear()

    def _notified(self) -> None:
        if self._next_turn is None:
            self._turn()

    def _turn(self) -> None:
        self._next_turn = None
        self.turns += 1
        targets = self._targets
        with_messages = self._with_messages
        clock = time.perf_counter_ns
        deadline = clock() + TURN_BUDGET_NS
        late = False
        for target, seq, message in self._thread.take():
            entry = targets.get(target)
            if entry is None:
                continue  # removed since the thread received it
            if seq is None:  # not vLLM's framing: the queue's path reports it
                entry.receive(message)
            # Nothing of it waits and the turn has time: applied now, not queued and dequeued
            # (what nearly every batch is at 1,000 publishers).
            elif entry.apply_now(seq, message, not late and not entry.queued):
                late = clock() >= deadline
                continue
            if not entry.queued:
                entry.queued = True
                with_messages.append(entry)
        # Round robin over the subscriptions with messages waiting: one busy publisher cannot
        # starve the others, and none holds the loop past the deadline.
        while with_messages and not late:
            entry = with_messages.popleft()
            if entry.removed:
                entry.queued = False
                continue
            if entry.apply(deadline):
                with_messages.append(entry)
            else:
                entry.queued = False
            late = clock() >= deadline
        if with_messages and self._loop is not None:
            self._next_turn = self._loop.call_soon(self._turn)
