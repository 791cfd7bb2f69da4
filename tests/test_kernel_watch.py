"""The notebook watchdog: a kernel that stops answering fails in about a minute, naming the cell; a busy
cell is never failed by it; `labkit run`'s time budget stops a notebook while it runs.

The lost and the late reply are made inside a real ipykernel: a cell replaces the kernel's
``session.send`` so that its own ``execute_reply`` is dropped (lost), or held until the next shell
message arrives (late: a reply that waits for new traffic), exactly what nbclient then waits for.
"""

import time

from labkit.lab.notebooks import execute_notebook
from labkit.lab.runner import RunOptions, run_notebooks
from test_runner import make_notebook as notebook

HOLD_REPLY = '''
k = get_ipython().kernel
_send, held = k.session.send, []
def send(stream, msg_type, *a, **kw):
    if msg_type == "execute_reply" and not held:
        held.append((stream, msg_type, a, kw))
        return None
    return _send(stream, msg_type, *a, **kw)
k.session.send = send
'''

RELEASE_ON_NEXT_SHELL_MESSAGE = '''
_info = k.shell_handlers["kernel_info_request"]
def info(*a, **kw):
    while len(held) == 1:
        s, t, aa, kk = held.pop()
        held.append("sent")
        _send(s, t, *aa, **kk)
    return _info(*a, **kw)
k.shell_handlers["kernel_info_request"] = info
'''


def test_a_lost_reply_fails_within_seconds_naming_the_cell(tmp_path):
    path = notebook(tmp_path / "lost.ipynb", "x = 1", "# the reply to this cell is lost\n" + HOLD_REPLY,
                    "print('never reached')")
    start = time.monotonic()
    run = execute_notebook(path, {"scale": "tiny"}, timeout=600, nudge_after=2, stall_after=4)
    took = time.monotonic() - start
    assert not run.ok and run.stopped, run.error
    assert "KernelStalled" in run.error and "cell 3 (# the reply to this cell is lost)" in run.error, run.error
    assert "stopped answering" in run.error and "execute_reply never came" in run.error
    assert run.nudges == ["cell 3 (# the reply to this cell is lost)"]
    assert took < 120, f"a lost reply must not wait out the 600 s cell timeout (took {took:.0f} s)"


def test_a_late_reply_is_woken_by_the_nudge(tmp_path):
    path = notebook(tmp_path / "late.ipynb", HOLD_REPLY + RELEASE_ON_NEXT_SHELL_MESSAGE, "print('after', 6 * 7)")
    run = execute_notebook(path, {"scale": "tiny"}, timeout=600, nudge_after=2, stall_after=30)
    assert run.ok, run.error
    assert len(run.nudges) == 1 and run.nudges[0].startswith("cell 2 ")
    assert "after 42" in str(run.notebook.cells[-1].outputs)


def test_without_the_nudge_a_late_reply_is_a_stall(tmp_path):
    """The control for the test above: the nudge is what rescues the held reply."""
    path = notebook(tmp_path / "late.ipynb", HOLD_REPLY + RELEASE_ON_NEXT_SHELL_MESSAGE, "print('after')")
    run = execute_notebook(path, {"scale": "tiny"}, timeout=600, nudge_after=None, stall_after=4)
    assert not run.ok and "KernelStalled" in run.error and not run.nudges


def test_a_busy_cell_is_never_taken_for_a_stall(tmp_path):
    path = notebook(tmp_path / "busy.ipynb", "import time\ntime.sleep(8)\nprint('slept')")
    run = execute_notebook(path, {"scale": "tiny"}, timeout=600, nudge_after=1, stall_after=2)
    assert run.ok, run.error
    assert not run.nudges


def test_max_seconds_stops_a_notebook_while_it_runs(tmp_path):
    path = notebook(tmp_path / "sleepy.ipynb", "print('start')", "import time\ntime.sleep(3600)")
    opts = RunOptions(scale="tiny", output=tmp_path / "out", max_seconds=5)
    start = time.monotonic()
    [result] = run_notebooks([path], opts)
    took = time.monotonic() - start
    assert took < 60, f"--max-seconds 5 let the notebook run {took:.0f} s"
    assert not result.ok and result.error is None
    [why] = result.over_budget
    assert "cell 3 (import time)" in why and "--max-seconds 5" in why, why


def _missed_wakeup(channel_class, wait: float) -> tuple[dict | None, float, object]:
    """Send a kernel message to a channel whose zmq wake-up is swallowed, as at a stall; what arrives?

    Reading ZMQ_EVENTS on the receiving socket from outside the event loop consumes the edge of its
    file descriptor (pyzmq #2173), so a waiting zmq.asyncio poll is not woken: the message sits in
    the socket, as this client's execute_reply did at the stalls of the soak runs."""
    import asyncio

    import zmq
    import zmq.asyncio
    from jupyter_client.session import Session

    async def scenario():
        ctx = zmq.asyncio.Context()
        tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        tx.bind("inproc://labkit-missed-wakeup")
        rx.connect("inproc://labkit-missed-wakeup")
        session = Session(key=b"k")
        channel = channel_class(rx, session)
        got = asyncio.ensure_future(channel.get_msg(timeout=wait))
        await asyncio.sleep(0.2)  # the poll is waiting
        session.send(zmq.Socket.shadow(tx.underlying), "execute_reply", {"status": "ok"})
        zmq.Socket.shadow(rx.underlying).getsockopt(zmq.EVENTS)  # swallow the wake-up
        start = time.monotonic()
        done, _ = await asyncio.wait({got}, timeout=4)
        took = time.monotonic() - start
        msg = got.result() if done else None
        got.cancel()
        tx.close(linger=0)
        rx.close(linger=0)
        ctx.term()
        return msg, took, channel

    return asyncio.run(scenario())


def test_a_missed_zmq_wakeup_costs_a_second_not_the_cell_timeout():
    from jupyter_client.channels import AsyncZMQSocketChannel

    from labkit.lab.kernel_watch import SlicedPollChannel

    plain, took, _ = _missed_wakeup(AsyncZMQSocketChannel, wait=30)
    assert plain is None and took >= 3.9, "control: the plain channel should miss the swallowed wake-up"
    sliced, took, channel = _missed_wakeup(SlicedPollChannel, wait=30)
    assert sliced is not None and sliced["msg_type"] == "execute_reply", "the sliced channel must find it"
    assert took < 2.5, f"found after {took:.1f} s: the slice is {1.0} s"
    assert channel.missed_wakeups == 1
