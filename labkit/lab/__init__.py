"""The lab's own tooling: the ``labkit`` command, its pre-flight check and the headless notebook runner.

``cli`` (the command line), ``doctor`` (``labkit doctor``), ``kernel`` (``labkit install-kernel``),
``runner`` (``labkit run``) with ``notebooks`` (execute one notebook), ``kernel_watch`` (a client
that does not hang on a lost wake-up) and ``memwatch`` (peak memory of a process tree).
Nothing outside this package imports it: the learning modules and ``labkit.core`` stay usable
without the tooling.
"""
