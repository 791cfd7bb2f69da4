"""The hardware catalog: accelerators and networks with their datasheet peaks (package data, YAML).

``catalog()`` lists accelerators, ``gpu(name)`` finds one case- and punctuation-insensitively,
``network(name)`` finds an interconnect. Every figure carries the datasheet it comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

CATALOG_FILE = Path(__file__).with_name("catalog.yaml")
DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8")
_DTYPE_ALIASES = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "tensorfloat32": "tf32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float8": "fp8", "float8e4m3fn": "fp8",
}


class HardwareLookupError(KeyError):
    """An unknown GPU, network or dtype name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Accelerator:
    """One accelerator (or CPU node) with dense peak FLOP/s per dtype, memory, links and power."""

    name: str
    vendor: str
    source: str
    peak_tflops: Mapping[str, float]
    memory_GB: float
    memory_type: str
    memory_bw_GBs: float
    pcie_gen: int
    pcie_bw_GBs: float
    link: str
    link_bw_GBs: float
    tdp_W: float
    aliases: tuple[str, ...] = ()

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes this device has a peak for, in catalog order."""
        return tuple(d for d in DTYPES if d in self.peak_tflops)

    @property
    def training_dtype(self) -> str:
        """The 16-bit dtype mixed-precision training uses here: bf16, else fp16 (V100), else fp32."""
        return next(d for d in ("bf16", "fp16", "fp32") if d in self.peak_tflops)

    def peak_flops(self, dtype: str = "auto") -> float:
        """Dense peak FLOP/s for ``dtype`` (``"bf16"``, ``"fp32"``, ``torch.bfloat16``; ``"auto"`` = training_dtype)."""
        key = self.training_dtype if dtype == "auto" else normalize_dtype(dtype)
        if key not in self.peak_tflops:
            raise HardwareLookupError(
                f"{self.name} has no fast path for {key!r} in its datasheet; "
                f"valid dtypes for it: {', '.join(self.dtypes)}"
            )
        return float(self.peak_tflops[key]) * 1e12

    @property
    def memory_bytes(self) -> float:
        return float(self.memory_GB) * 1e9

    @property
    def memory_bw(self) -> float:
        """Peak device-memory bandwidth in bytes/s."""
        return float(self.memory_bw_GBs) * 1e9

    @property
    def link_bw(self) -> float:
        """Intra-node GPU-GPU bandwidth per direction in bytes/s (half the datasheet's two-way total);
        falls back to PCIe when there is no NVLink/xGMI."""
        total = self.link_bw_GBs or self.pcie_bw_GBs
        return float(total) * 1e9 / 2

    def ridge_point(self, dtype: str = "auto") -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline turns from memory- to compute-bound."""
        return self.peak_flops(dtype) / self.memory_bw


@dataclass(frozen=True)
class Network:
    """A node-to-node interconnect: line rate per port and a typical small-message latency."""

    name: str
    kind: str
    bandwidth_Gbps: float
    latency_us: float
    source: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def bandwidth(self) -> float:
        """Bytes/s per port, one direction."""
        return self.bandwidth_Gbps * 1e9 / 8

    @property
    def latency(self) -> float:
        """Seconds."""
        return self.latency_us * 1e-6


_MIN_PARTIAL = 3   # shortest name (after normalising) matched by prefix or containment


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def normalize_dtype(dtype: Any) -> str:
    """``torch.bfloat16``, ``"bfloat16"``, ``"BF16"`` -> ``"bf16"``; unknown -> error listing valid names."""
    text = str(dtype).replace("torch.", "")
    key = _key(text)
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise HardwareLookupError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    return key


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[tuple[Accelerator, ...], tuple[Network, ...]]:
    data = yaml.safe_load(Path(path).read_text())
    accs = tuple(
        Accelerator(**{**a, "aliases": tuple(a.get("aliases", ())), "peak_tflops": dict(a["peak_tflops"])})
        for a in data["accelerators"]
    )
    nets = tuple(Network(**{**n, "aliases": tuple(n.get("aliases", ()))}) for n in data["networks"])
    return accs, nets


def catalog(path: Path | str = CATALOG_FILE) -> list[Accelerator]:
    """All accelerators in the catalog (GPUs and the generic CPU node)."""
    return list(_load(str(path))[0])


def networks(path: Path | str = CATALOG_FILE) -> list[Network]:
    """All node-to-node networks in the catalog."""
    return list(_load(str(path))[1])


def _find(items, name: str, what: str):
    """Exact name or alias first; else a unique prefix of one; else the entry whose name or alias is the
    longest one contained in ``name`` ("a100 80gb sxm" holds "A100-80GB"). All case/punctuation-free."""
    if isinstance(name, (Accelerator, Network)):
        return name
    want = _key(name)
    keys = [(item, {_key(item.name), *(_key(a) for a in item.aliases)}) for item in items]
    found = [item for item, ks in keys if want in ks]
    if not found and len(want) >= _MIN_PARTIAL:
        found = [item for item, ks in keys if any(k.startswith(want) for k in ks)]
    if not found and len(want) >= _MIN_PARTIAL:
        # a contained name counts only when every number left over is in the entry's full name:
        # "h200 141gb" is the H200-SXM-141GB, but "tesla v100 sxm2 16gb" must not become the 32 GB part
        def fits(k: str, item) -> bool:
            return k in want and all(n in _key(item.name) for n in re.findall(r"\d+", want.replace(k, "", 1)))

        inside = [(max(len(k) for k in ks if fits(k, item)), item) for item, ks in keys
                  if any(fits(k, item) for k in ks)]
        longest = max((n for n, _ in inside), default=0)
        found = [item for n, item in inside if n == longest]
    valid = ", ".join(i.name for i in items)
    if len(found) == 1:
        return found[0]
    if found:
        raise HardwareLookupError(
            f"{what} {name!r} is ambiguous: it matches {', '.join(i.name for i in found)}; give more of the "
            f"name. Valid names: {valid} (case and punctuation are ignored)")
    raise HardwareLookupError(f"unknown {what} {name!r}; valid names: {valid} (case and punctuation are ignored)")


def gpu(name: str | Accelerator) -> Accelerator:
    """The accelerator called ``name`` ("A100-80GB", "h100 sxm", "H100-SXM5", "a100 80gb sxm", "MI300X", "cpu"):
    exact name or alias, else a unique prefix, else the longest contained name; errors list valid names."""
    return _find(catalog(), name, "accelerator")


def network(name: str | Network) -> Network:
    """The network called ``name`` ("IB-NDR-400", "ndr", "RoCE-100"); error lists valid names."""
    return _find(networks(), name, "network")


def match_device(device_name: str, memory_bytes: float | None = None) -> Accelerator | None:
    """The catalog entry for a device torch reports ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"):
    the model number must appear in the name; PCIe vs SXM and memory size break ties. None when unknown."""
    text = _key(device_name)
    found = [a for a in catalog() if a.vendor != "generic" and _key(a.name.split("-")[0]) in text]
    if not found:
        return None
    if "pcie" in text:
        found = [a for a in found if "pcie" in _key(a.name)] or found
    else:
        found = [a for a in found if "pcie" not in _key(a.name)] or found
    if memory_bytes:
        found.sort(key=lambda a: abs(a.memory_bytes - memory_bytes))
    return found[0]
