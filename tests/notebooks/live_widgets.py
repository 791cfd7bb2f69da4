# %% [markdown]
# # Live widgets (a test notebook, not part of the lab)
#
# A plotly `FigureWidget` and an ipywidgets slider, updated live from the kernel the way the
# training notebook's live plot is. `tests/test_browser.py` runs it in a real JupyterLab.

# %% parameters
scale = None
steps = 60

# %%
import time

import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import display

fig = go.FigureWidget(go.Scatter(x=[], y=[], mode="lines+markers", name="loss"))
fig.layout.title = "power 1"
fig.layout.height = 300
slider = widgets.IntSlider(value=1, min=1, max=5, description="power")


def on_power(change):
    """The slider drives the figure: a round trip browser -> kernel -> browser."""
    n = change["new"]
    fig.layout.title = f"power {n}"
    xs = list(fig.data[0].x)
    fig.data[0].y = [1.0 / (1 + x) ** n for x in xs]


slider.observe(on_power, names="value")
display(widgets.VBox([slider, fig]))

# %%
for step in range(steps):
    with fig.batch_update():
        fig.data[0].x = tuple(fig.data[0].x) + (step,)
        fig.data[0].y = tuple(fig.data[0].y) + (1.0 / (1 + step) ** slider.value,)
    time.sleep(0.15)
print("points:", len(fig.data[0].x))

# %% [markdown]
# The lab's own `LivePlot`, fed events the way a training run's ranks emit them.

# %%
from labkit.core.events import emit
from labkit.widgets.live_plot import LivePlot

plot = LivePlot(metrics=("loss",), x="step", group="rank", title="training (simulated)")
display(plot)
for step in range(30):
    for rank in (0, 1):
        emit("train", sink=plot, step=step, rank=rank, loss=1.0 / (1 + step) + 0.1 * rank)
    time.sleep(0.15)
plot.close()
print("events:", len(plot.events))
