"""Errors of the cluster layer; every message names the fix."""

from __future__ import annotations

from ..config import ConfigError


class ClusterError(RuntimeError):
    """A cluster could not start or was asked for something this site cannot give."""


class ClusterConfigError(ClusterError, ConfigError):
    """A profile asks for something Slurm cannot give (unknown partition, too many GPUs...)."""


class ClusterTimeout(ClusterError, TimeoutError):
    """Workers did not join in time; ``jobs`` holds what squeue said about each job."""

    def __init__(self, message: str, jobs: list | None = None):
        super().__init__(message)
        self.jobs = list(jobs or [])
