"""Execute notebook cells so that a lost wake-up costs a second and a stopped kernel a minute, not 600 s.

nbclient waits for two things per cell: the kernel's ``status: idle`` on IOPub (the cell finished)
and the ``execute_reply`` on the shell channel, each with one long zmq.asyncio ``poll``. The hangs
of notebook 02 at its widget cell (about 1 run in 15 under load, on ipykernel 6.31 and 7.4 alike)
were on the client's side: at the stall the kernel was idle in every thread and the reply sat in
this client's own shell socket (``ZMQ_EVENTS`` had ``POLLIN``), but the poll's edge-triggered
wake-up never came (pyzmq #2173 reports the same missed wake-up). So:

* :class:`SlicedPollChannel` polls in slices of a second; pyzmq looks at the socket itself when a
  slice ends, so a missed wake-up is found within a second and counted (``missed_wakeups``).
* the watchdog (:class:`WatchedClient`) fails a cell whose reply still does not come: the cell
  finished (IOPub idle) or was never started, and ``nudge_after`` seconds later the kernel is
  nudged with shell traffic that cannot change the notebook (``kernel_info_request``, and an empty
  silent execute once the cell is done: new messages wake a kernel socket that missed its own
  event), again every ``nudge_after`` seconds; ``stall_after`` seconds after the first nudge it
  raises :class:`KernelStalled` naming the cell.
* a cell that is busy (IOPub ``busy``, no ``idle`` yet) is never failed by the watchdog: training
  for minutes is legitimate; only the cell timeout applies to it.
* ``should_stop()`` is polled every ``poll`` seconds; a reason it returns (a time or memory budget
  crossed) stops the notebook at once with :class:`NotebookStopped` naming the running cell.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, Callable

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from nbclient import NotebookClient
from traitlets import Type


def cell_label(cell: Any, index: int) -> str:
    """``cell 7 (panel = EstimatorPanel(...))``: the index and the first line of its source."""
    first = next((line.strip() for line in str(cell.get("source", "")).splitlines() if line.strip()), "")
    if len(first) > 60:
        first = first[:57] + "..."
    return f"cell {index} ({first})" if first else f"cell {index}"


POLL_SLICE_S = 1.0  # longest wait on one zmq poll before looking at the socket again


class SlicedPollChannel(AsyncZMQSocketChannel):
    """A kernel channel whose waits look at the socket at least every second.

    zmq.asyncio wakes a waiting ``poll`` from the socket's edge-triggered file descriptor; when
    that wake-up is missed, a message sits in the socket unread while the poll waits out its whole
    timeout (nbclient: the cell timeout, 600 s; IOPub: for ever). Seen in labkit's soak runs: at a
    stall, this client's shell socket held the execute_reply (ZMQ_EVENTS had POLLIN) with the
    kernel idle, on ipykernel 6.31 and 7.4 alike (pyzmq #2173 describes the same missed wake-up).
    pyzmq checks the socket itself when a poll times out, so polling in slices of
    ``POLL_SLICE_S`` bounds a missed wake-up to about a second. ``missed_wakeups`` counts the
    messages that were found only by that check.
    """

    missed_wakeups = 0

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:
        """Like the parent's, waiting at most ``timeout`` seconds (None: for ever), in slices."""
        assert self.socket is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else max(0.0, min(POLL_SLICE_S, deadline - time.monotonic()))
            began = time.monotonic()
            ready = await self.socket.poll(int(left * 1000))
            if ready:
                if left > 0 and time.monotonic() - began >= left * 0.98:  # found by the timeout's own check
                    self.missed_wakeups += 1
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class SlicedPollKernelClient(AsyncKernelClient):
    """An async kernel client whose shell and IOPub waits use :class:`SlicedPollChannel`."""

    shell_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]


class KernelStalled(RuntimeError):
    """The kernel finished a cell (or never started it) and then stopped answering."""


class NotebookStopped(RuntimeError):
    """A budget given by the caller (time, memory) was crossed while a cell ran."""


@dataclass
class CellWatch:
    """What the watchdog knows about the cell that is running."""

    label: str
    sent: float
    busy_at: float | None = None
    idle_at: float | None = None
    last_iopub: float | None = None
    nudged_at: float | None = None
    last_nudge: float | None = None


@dataclass
class WatchLog:
    """What the watchdog did during one notebook: cells nudged and how their replies came."""

    nudges: list[str] = field(default_factory=list)
    rescued: list[str] = field(default_factory=list)
    missed_wakeups: int = 0  # replies found only by a poll slice's own check (SlicedPollChannel)


class WatchedClient(NotebookClient):
    """A :class:`nbclient.NotebookClient` whose cells run under the watchdog described in this module."""

    def __init__(self, nb: Any, *, nudge_after: float | None = 5.0, stall_after: float = 55.0, poll: float = 0.5,
                 should_stop: Callable[[], str | None] | None = None,
                 on_stall: Callable[["WatchedClient", CellWatch], None] | None = None, **kw: Any) -> None:
        super().__init__(nb, **kw)
        self.nudge_after = nudge_after
        self.stall_after = stall_after
        self.poll = poll
        self.should_stop = should_stop
        self.on_stall = on_stall
        self.watch_log = WatchLog()
        self.current: CellWatch | None = None

    def create_kernel_manager(self) -> Any:
        """nbclient's kernel manager, handing out :class:`SlicedPollKernelClient` clients."""
        km = super().create_kernel_manager()
        km.client_class = f"{SlicedPollKernelClient.__module__}.{SlicedPollKernelClient.__qualname__}"
        return km

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        """Note IOPub traffic and busy/idle of the running cell, then let nbclient handle the message."""
        watch = self.current
        if watch is not None:
            now = time.monotonic()
            watch.last_iopub = now
            if msg.get("msg_type") == "status":
                state = msg.get("content", {}).get("execution_state")
                if state == "busy" and watch.busy_at is None:
                    watch.busy_at = now
                elif state == "idle":
                    watch.idle_at = now
        return super().process_message(msg, cell, cell_index)  # raises CellExecutionComplete at idle

    async def async_execute_cell(self, cell: Any, cell_index: int, execution_count: int | None = None,
                                 store_history: bool = True) -> Any:
        """Run one cell as nbclient does, racing it against the watchdog."""
        if cell.cell_type != "code" or not cell.source.strip():
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        self.current = CellWatch(label=cell_label(cell, cell_index), sent=time.monotonic())
        before = asyncio.all_tasks()
        run = asyncio.ensure_future(super().async_execute_cell(cell, cell_index, execution_count, store_history))
        dog = asyncio.ensure_future(self._watch(self.current))
        try:
            done, _ = await asyncio.wait({run, dog}, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                if self.current.nudged_at is not None:
                    self.watch_log.rescued.append(self.current.label)
                return run.result()
            run.cancel()
            try:
                await run
            except BaseException:  # noqa: BLE001 - nbclient turns the cancel into DeadKernelError; ours wins
                pass
            for task in asyncio.all_tasks() - before - {dog, asyncio.current_task()}:
                task.cancel()  # nbclient's own pollers of this cell (kernel alive, IOPub), left behind
            raise dog.exception() or KernelStalled(self.current.label)
        finally:
            dog.cancel()
            self.current = None
            if self.kc is not None:
                self.watch_log.missed_wakeups = sum(
                    getattr(ch, "missed_wakeups", 0) for ch in (self.kc.shell_channel, self.kc.iopub_channel))

    async def _watch(self, watch: CellWatch) -> None:
        """Return (by raising) only when the cell must be given up; otherwise wait for ever."""
        while True:
            await asyncio.sleep(self.poll)
            reason = self.should_stop() if self.should_stop is not None else None
            if reason:
                raise NotebookStopped(f"stopped at {watch.label}: {reason}")
            now = time.monotonic()
            if watch.busy_at is not None and watch.idle_at is None:
                continue  # the cell runs: legitimately busy, never a stall
            waited_since = watch.idle_at if watch.idle_at is not None else watch.sent
            if watch.nudged_at is not None and now - watch.nudged_at >= self.stall_after:
                self._stalled(watch, now)
            if self.nudge_after is None:
                if now - waited_since >= self.stall_after:
                    self._stalled(watch, now)
            elif now - max(waited_since, watch.last_nudge or 0.0) >= self.nudge_after:
                self._nudge(watch, now)

    def _nudge(self, watch: CellWatch, now: float) -> None:
        """Send shell traffic that cannot change the notebook: new messages wake a socket whose wake-up
        was swallowed. Repeated every ``nudge_after`` seconds until ``stall_after``."""
        if watch.nudged_at is None:
            watch.nudged_at = now
            self.watch_log.nudges.append(watch.label)
            self.log.warning("labkit: no execute_reply for %s %.0f s after it %s; nudging the kernel",
                             watch.label, now - (watch.idle_at or watch.sent),
                             "finished" if watch.idle_at else "was sent")
        watch.last_nudge = now
        assert self.kc is not None
        self.kc.kernel_info()
        if watch.idle_at is not None:  # the cell is done: an empty silent request is a no-op for the notebook
            self.kc.execute("", silent=True, store_history=False, allow_stdin=False)

    def _stalled(self, watch: CellWatch, now: float) -> None:
        if self.on_stall is not None:
            self.on_stall(self, watch)
        if watch.idle_at is not None:
            what = (f"the kernel finished {watch.label} {now - watch.idle_at:.0f} s ago (IOPub idle) but its "
                    "execute_reply never came")
        else:
            what = f"the kernel never started {watch.label} ({now - watch.sent:.0f} s after it was sent)"
        nudge = ", not even after nudges (kernel_info and an empty silent request)" if watch.nudged_at is not None else ""
        raise KernelStalled(
            f"{what}{nudge}, although this client looks at its sockets every second: the kernel stopped "
            "answering (a crash in native code, or a hang in the kernel's own messaging). Run the notebook "
            "again; if it stops at the same cell again, record where each side waits with "
            "`python scripts/soak.py --no-nudge --dump DIR <notebook>` and report it with the dumps."
        )
