"""Shared infrastructure under the learning modules: ``events`` (the metrics stream from Dask
workers to the notebook) and ``ranks`` (a function run as torch.distributed ranks, one per Dask worker).

It imports no learning module and nothing from ``labkit.lab``.
"""
