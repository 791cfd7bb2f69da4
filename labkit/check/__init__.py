"""Exercise checkers: run the learner's code on fresh inputs and say what is wrong, not just that it is.

One dialect for every topic (``attention``, ``bert``, ``cluster``, ``data``, ``finetune``, ``hardware``,
``prune``, ``serve``, ``train``, and any module added beside them):

    from labkit.check.<topic> import check, solution
    check("<exercise>", answer, **options)      # -> Result, never raises for a wrong answer

``answer`` is the learner's function (or, for an exercise about values, the values); ``options`` are
what a checker needs besides it (``seed=``, ``cluster=``). ``check.names`` lists a topic's exercises;
an unknown name raises :class:`UnknownExercise`, which lists them. The :class:`Result` has
``passed`` (True, False, or None while the exercise is not attempted yet: the function still raises
``NotImplementedError``, or the answer is None), the exercise ``name``, a ``message`` that names the
mistake, a short ``problem`` tag (None when passed) and ``details``; it is truthy only when passed
and renders green, red or amber in a notebook. So a notebook with unfinished or wrong exercises runs
on headless. Topic authors build ``check`` with :func:`checker_book`, call the learner's code through
:func:`attempt` and return :func:`correct` or :func:`mistake`.

Solutions convention: each topic module offers ``solution(name)`` (e.g.
``labkit.check.attention.solution("attention")``); nothing shows a solution unless that function
is called. Build it with :func:`solution_book`, or wrap a source string with :func:`reveal`: the
result is the source text (a ``str``, so ``print`` / ``exec`` work) that JupyterLab shows as a
collapsed block, opened with one click.
"""

from __future__ import annotations

import html
import inspect
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Result:
    """A checker's verdict on one exercise: ``passed`` (None = not attempted yet) and a message naming the mistake."""

    passed: bool | None
    message: str
    problem: str | None = None  # a short tag tests and instructors match on; None when passed
    details: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""  # the exercise; ``check`` fills it in

    def __bool__(self) -> bool:
        return self.passed is True

    @property
    def icon(self) -> str:
        """✅ passed, ❌ a mistake, ⏳ not attempted yet."""
        return {True: "✅", False: "❌"}.get(self.passed, "⏳")

    def __str__(self) -> str:
        return f"{self.icon} {self.name + ': ' if self.name else ''}{self.message}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        color = {True: "#1a7f37", False: "#cf222e"}.get(self.passed, "#9a6700")
        label = {True: "correct", False: "not right yet"}.get(self.passed, "not attempted yet")
        name = f"<code>{html.escape(self.name)}</code> " if self.name else ""
        return (f'<div class="labkit-check" style="color:{color};white-space:pre-wrap">{self.icon} {name}'
                f"<b>{label}</b>: {html.escape(self.message)}</div>")


def correct(message: str, **details: Any) -> Result:
    """A passing verdict."""
    return Result(True, message, None, details)


def mistake(problem: str, message: str, **details: Any) -> Result:
    """A failing verdict: ``problem`` is a short tag, ``message`` names the mistake and the fix."""
    return Result(False, message, problem, details)


class _Stopped(Exception):
    """The learner's code raised: carries the verdict out of a checker's body."""

    def __init__(self, result: Result):
        super().__init__(result.message)
        self.result = result


def _fn_name(fn: Any) -> str:
    name = getattr(fn, "__name__", "")
    return name if name.isidentifier() else "your function"


def attempt(fn: Callable[..., Any], *args: Any, on: str = "", **kwargs: Any) -> Any:
    """Call the learner's ``fn``; if it raises, the check ends there with a Result saying so (``on`` names the input)."""
    where = f" (on {on})" if on else ""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _Stopped(Result(None, f"not yet: {_fn_name(fn)} still raises NotImplementedError; replace that "
                                    "line with your code and run the cell again", "not_implemented")) from None
    except Exception as exc:  # the learner's bug, reported plainly instead of a traceback
        raise _Stopped(mistake("error", f"your function raised {type(exc).__name__}: {exc}{where}")) from None


def checker_book(topic: str, checkers: Mapping[str, Callable[..., Result]]) -> Callable[..., Result]:
    """Make a topic's ``check(exercise, answer, **options)`` from ``{exercise: checker(answer, **options)}``.
    The exercise names are on ``check.names``."""
    table = dict(checkers)

    def check(exercise: str, answer: Any, **options: Any) -> Result:
        if exercise not in table:
            raise UnknownExercise(
                f"no {topic} exercise named {exercise!r}; valid names: {', '.join(table) or '(none)'}")
        checker = table[exercise]
        try:
            inspect.signature(checker).bind(answer, **options)
        except TypeError as exc:  # the notebook's call is off, not the learner's answer
            raise TypeError(f"check({exercise!r}, answer, ...): {exc}; the checker takes "
                            f"{inspect.signature(checker)}") from None
        if answer is None:
            result = Result(None, "not yet: there is no answer to check (None); pass your function or values",
                            "not_attempted")
        else:
            try:
                result = checker(answer, **options)
            except _Stopped as stop:
                result = stop.result
            except Exception as exc:  # an answer of the wrong kind tripped the checker: say so, never crash
                result = mistake("unusable", f"your answer could not be checked ({type(exc).__name__}: {exc}); "
                                             "is it the kind of function or value the exercise asks for?")
        if not isinstance(result, Result):  # labkit's bug, not the learner's: fail loudly in the tests
            raise TypeError(f"the {topic} checker of {exercise!r} returned {type(result).__name__}, not a Result: "
                            "return correct(...) or mistake(...)")
        return replace(result, name=exercise)

    check.__doc__ = f"Check your answer to a {topic} exercise: a Result that names the mistake, never a traceback."
    check.__qualname__ = check.__name__ = "check"
    check.names = tuple(table)  # type: ignore[attr-defined]
    return check


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
