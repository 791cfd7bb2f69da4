"""LivePlot keeps each line sorted by x, so points that arrive out of order draw no zig-zag."""

import random

from labkit.core.events import emit
from labkit.widgets.live_plot import LivePlot


def test_out_of_order_points_are_drawn_sorted_by_x():
    plot = LivePlot(metrics=("perplexity",), x="sparsity", group="method", kinds=["prune"], mode="widget",
                    min_interval=0.0)
    amounts = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]
    ppl = {a: 10.0 + 40 * a * a for a in amounts}  # y depends on x: a mismatch would show
    order = amounts[:]
    random.Random(3).shuffle(order)  # the order a sweep's workers might finish in
    assert order != sorted(order)
    for a in order:
        emit("prune", plot, method="structured", sparsity=a, perplexity=ppl[a])
        emit("prune", plot, method="unstructured", sparsity=a / 2, perplexity=ppl[a] / 2)
        xs = [p[0] for p in plot.points("perplexity", "structured")]
        assert xs == sorted(xs)  # sorted while it is live, not only at the end
    plot.draw()
    traces = {t.name: t for t in plot.widget.data}
    structured, unstructured = traces["method structured"], traces["method unstructured"]
    assert list(structured.x) == amounts and list(structured.y) == [ppl[a] for a in amounts]
    assert list(unstructured.x) == [a / 2 for a in amounts]
    assert list(unstructured.y) == [ppl[a] / 2 for a in amounts]
    assert [e["sparsity"] for e in plot.events[::2]] == order  # the events themselves keep arrival order


def test_equal_x_keep_arrival_order_and_incomparable_x_append():
    plot = LivePlot(metrics=("loss",), group=None, mode="silent")
    for step, loss in [(2, 1.0), (1, 2.0), (2, 3.0), (0, 4.0)]:
        plot({"kind": "train", "step": step, "loss": loss})
    assert plot.points("loss") == [(0, 4.0), (1, 2.0), (2, 1.0), (2, 3.0)]
    plot({"kind": "train", "step": "final", "loss": 0.5})  # a str among ints: no crash, drawn last
    assert plot.points("loss")[-1] == ("final", 0.5)
