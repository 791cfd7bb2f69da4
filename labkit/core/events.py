"""The metrics stream: ``emit()`` where work runs, ``subscribe()`` where the notebook draws.

An event is a flat dict: ``{"kind": "train", "time": ..., "rank": 0, "step": 10, "loss": 3.2}``.

- In the notebook's own process, work takes a ``sink`` (any callable, e.g. a ``LivePlot`` or a
  ``Recorder``) and ``emit(..., sink=sink)`` calls it directly.
- On a Dask worker, ``emit`` logs the event under the Dask topic ``labkit``; the notebook follows
  it with ``subscribe(client, callback)``, which rides on ``Client.subscribe_topic``
  (``distributed.pubsub`` is gone from distributed since 2025).

Nothing here is global: the dispatcher that fans one Dask topic out to many callbacks lives on
the client object it serves.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

TOPIC = "labkit"
Event = dict[str, Any]
Sink = Callable[[Event], None]


def _plain(value: Any) -> Any:
    """Make a value msgpack-friendly: tensors and numpy scalars become floats or ints."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _plain(item())
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _current_worker():
    try:
        # lazy: distributed (~0.8 s import); emit() also runs where no Dask is loaded (a served model, a script)
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def emit(kind: str, sink: Sink | None = None, **fields: Any) -> Event:
    """Build an event and deliver it: to ``sink`` when given, else to the Dask topic when on a worker.

    Returns the event, so callers can also keep it. Never raises for delivery problems: metrics
    must not be able to break a training run.
    """
    event: Event = {"kind": kind, "time": time.time()}
    event.update({k: _plain(v) for k, v in fields.items()})
    worker = _current_worker()
    if worker is not None:
        event.setdefault("worker", worker.address)
    if sink is not None:
        try:
            sink(event)
        except Exception as exc:  # a broken plot or logger must not end a training run
            warnings.warn(f"labkit.core.events: the sink {sink!r} failed on a {kind!r} event "
                          f"({type(exc).__name__}: {exc}); the event was dropped and the work goes on. "
                          "Fix the sink, or run without it (sink=None)", RuntimeWarning, stacklevel=2)
    elif worker is not None:
        try:
            worker.log_event(TOPIC, event)
        except Exception:  # a closing worker: drop the metric, keep the work
            pass
    return event


class Recorder:
    """A sink that keeps every event, for tests, reports and after-the-fact plots."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(dict(event))

    def of(self, kind: str) -> list[Event]:
        """The events of one kind, in arrival order."""
        with self._lock:
            return [e for e in self.events if e.get("kind") == kind]

    def __len__(self) -> int:
        return len(self.events)


class _Dispatcher:
    """Fans the client's single ``labkit`` topic handler out to many callbacks."""

    def __init__(self, client) -> None:
        self.client = client
        self.callbacks: dict[int, tuple[Callable[[Event], None], frozenset[str] | None]] = {}
        self.lock = threading.Lock()
        self.next_id = 0
        client.subscribe_topic(TOPIC, self.handle)

    def handle(self, item: Any) -> None:
        event = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if not isinstance(event, dict):
            return
        with self.lock:
            targets = list(self.callbacks.values())
        for callback, kinds in targets:
            if kinds is None or event.get("kind") in kinds:
                try:
                    callback(event)
                except Exception:  # a broken view must not stop the others
                    pass

    def add(self, callback: Callable[[Event], None], kinds: frozenset[str] | None) -> int:
        with self.lock:
            self.next_id += 1
            self.callbacks[self.next_id] = (callback, kinds)
            return self.next_id

    def remove(self, key: int) -> None:
        with self.lock:
            self.callbacks.pop(key, None)
            empty = not self.callbacks
        if empty:
            try:
                self.client.unsubscribe_topic(TOPIC)
            except Exception:
                pass
            if getattr(self.client, "_labkit_events", None) is self:
                del self.client._labkit_events


@dataclass
class Subscription:
    """A live subscription; ``close()`` stops the callback."""

    dispatcher: _Dispatcher
    key: int
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.dispatcher.remove(self.key)
            self.closed = True

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def subscribe(client, callback: Callable[[Event], None], kinds: Iterable[str] | None = None) -> Subscription:
    """Call ``callback(event)`` for every event the client's workers emit (optionally only some kinds)."""
    dispatcher = getattr(client, "_labkit_events", None)
    if dispatcher is None:
        dispatcher = _Dispatcher(client)
        client._labkit_events = dispatcher
    key = dispatcher.add(callback, frozenset(kinds) if kinds is not None else None)
    return Subscription(dispatcher, key)
