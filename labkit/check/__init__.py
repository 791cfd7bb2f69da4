"""Exercise checkers: run the learner's code on fresh inputs and say what is wrong, not just that it is.

Solutions convention: each topic module offers ``solution(name)`` (e.g.
``labkit.check.attention.solution("softmax")``); nothing shows a solution unless that function
is called. Build it with :func:`solution_book`, or wrap a source string with :func:`reveal`: the
result is the source text (a ``str``, so ``print`` / ``exec`` work) that JupyterLab shows as a
collapsed block, opened with one click.
"""

from __future__ import annotations

import html
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass
class Result:
    """A checker's verdict: ``ok``, a message that says what to fix, and a short ``problem`` tag
    (None when ok) that tests and instructors can match on. Truthy when ok."""

    ok: bool
    message: str
    problem: str | None = None
    details: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return ("✅ " if self.ok else "❌ ") + self.message

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        return str(self)


class UnknownExercise(KeyError, ValueError):
    """No exercise of that name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Solution(str):
    """A solution's source code: a plain ``str`` that renders collapsed (``<details>``) in Jupyter."""

    title: str = "solution"

    def __new__(cls, source: str, title: str = "solution") -> "Solution":
        obj = super().__new__(cls, source)
        obj.title = title
        return obj

    def _repr_html_(self) -> str:
        return (
            '<details class="labkit-solution"><summary>Show the solution: '
            f"<code>{html.escape(self.title)}</code></summary>"
            f'<pre><code class="language-python">{html.escape(str(self))}</code></pre></details>'
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"# {self.title}\n{self}")


def solution_source(solution: str | Callable[..., Any], name: str | None = None, private: str = "_solution_") -> str:
    """Source text of a reference solution (a function or a string), dedented; a function named
    ``{private}{name}`` is renamed ``name`` so the learner sees the name the exercise asks for."""
    src = solution if isinstance(solution, str) else inspect.getsource(solution)
    src = textwrap.dedent(src).strip("\n") + "\n"
    if name and private:
        src = src.replace(f"def {private}{name}(", f"def {name}(")
    return src


def reveal(solution: str | Callable[..., Any], title: str | None = None) -> Solution:
    """Wrap a solution (source text or a function) so JupyterLab shows it folded until clicked."""
    name = title or getattr(solution, "__name__", None) or "solution"
    return Solution(solution_source(solution, name=title), title=name)


def solution_book(topic: str, solutions: Mapping[str, str | Callable[..., Any]]) -> Callable[[str], Solution]:
    """Make a topic's ``solution(name)``: the named reference solution as a :class:`Solution`.
    The exercise names are on ``solution.names``."""
    table = dict(solutions)

    def solution(name: str) -> Solution:
        if name not in table:
            raise UnknownExercise(
                f"no {topic} exercise named {name!r}; valid names: {', '.join(table) or '(none)'}"
            )
        return reveal(table[name], title=name)

    solution.__doc__ = f"The reference solution of a {topic} exercise, folded until you open it."
    solution.__qualname__ = solution.__name__ = "solution"
    solution.names = tuple(table)  # type: ignore[attr-defined]
    return solution


def defined_function(source: str) -> Callable[..., Any]:
    """The public function a reference solution's source defines, ready to call (tests, demos)."""
    space: dict[str, Any] = {}
    exec(source, space)  # labkit's own constant solution source, never learner input
    return next(v for k, v in space.items() if callable(v) and not k.startswith("_") and inspect.isfunction(v))
