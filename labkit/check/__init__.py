"""Exercise checkers: run the learner's code on fresh inputs and say what is wrong, not just that it is."""
