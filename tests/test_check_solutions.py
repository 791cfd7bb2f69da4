"""The solutions convention: a topic's solution(name) returns source text that Jupyter shows folded."""

import pytest

from labkit.check import Solution, UnknownExercise, reveal, solution_book


def _solution_softmax(x):
    m = max(x)
    return [v - m for v in x]  # <b>not</b> markup


def test_solution_book_returns_folded_source():
    solution = solution_book("attention", {"softmax": _solution_softmax, "mask": "def mask(t):\n    return t\n"})
    sol = solution("softmax")
    assert isinstance(sol, str) and isinstance(sol, Solution)
    assert sol.startswith("def softmax(x):") and "_solution_" not in sol
    space = {}
    exec(sol, space)
    assert space["softmax"]([1, 3]) == [-2, 0]
    page = sol._repr_html_()
    assert page.startswith('<details class="labkit-solution">') and "<details open" not in page
    assert "&lt;b&gt;not&lt;/b&gt;" in page and "<b>not</b>" not in page
    assert "<summary>Show the solution: <code>softmax</code></summary>" in page
    assert solution("mask") == "def mask(t):\n    return t\n"


def test_unknown_exercise_lists_valid_names():
    solution = solution_book("data", {"normaliser": "x = 1", "count_duplicates": "y = 2"})
    with pytest.raises(KeyError, match="valid names: normaliser, count_duplicates"):
        solution("normalizer")
    with pytest.raises(ValueError):  # either style of `except` catches it
        solution("nope")
    assert issubclass(UnknownExercise, KeyError)


def test_reveal_plain_text_and_pretty_repr():
    sol = reveal("  print('hi')\n", title="greeting")
    assert sol == "print('hi')\n" and sol.title == "greeting"
    from IPython.lib.pretty import pretty

    assert pretty(sol) == "# greeting\nprint('hi')\n"


TOPICS = ["attention", "cluster", "data", "finetune", "hardware", "prune", "serve", "train"]


@pytest.mark.parametrize("topic", TOPICS)
def test_every_topic_shows_solutions_folded_and_runnable(topic):
    import importlib

    from labkit.check import defined_function

    mod = importlib.import_module(f"labkit.check.{topic}")
    assert mod.solution.names, f"labkit.check.{topic} has no solutions"
    for name in mod.solution.names:
        sol = mod.solution(name)
        assert isinstance(sol, Solution) and sol.title == name
        assert sol._repr_html_().startswith('<details class="labkit-solution">')  # folded until clicked
        assert callable(defined_function(sol))  # the shown source defines a function
    with pytest.raises(UnknownExercise, match="valid names: " + ", ".join(mod.solution.names)):
        mod.solution("no-such-exercise")
