"""HPC hardware for LLMs: a catalog of accelerators and networks, estimators that size a run,
and functions that inspect and measure the live Dask cluster."""

from labkit.hardware.catalog import (
    Accelerator,
    HardwareLookupError,
    Network,
    catalog,
    gpu,
    network,
    networks,
    normalize_dtype,
)
from labkit.hardware.estimate import (
    EstimateError,
    GPTConfig,
    allreduce_time,
    compute_optimal,
    count_params,
    energy,
    estimate_training,
    gradient_sync,
    inference_memory,
    pipeline_bubble,
    plan_run,
    storage,
    training_flops,
    training_memory,
)
from labkit.hardware.inspect import GPUInfo, WorkerHardware, inspect_cluster, probe
from labkit.hardware.measure import ClusterMeasurement, MeasureConfig, measure_cluster

__all__ = [
    "Accelerator", "HardwareLookupError", "Network", "catalog", "gpu", "network", "networks", "normalize_dtype",
    "EstimateError", "GPTConfig", "allreduce_time", "compute_optimal", "count_params", "energy", "estimate_training",
    "gradient_sync", "inference_memory", "pipeline_bubble", "plan_run", "storage", "training_flops", "training_memory",
    "GPUInfo", "WorkerHardware", "inspect_cluster", "probe", "ClusterMeasurement", "MeasureConfig", "measure_cluster",
]
