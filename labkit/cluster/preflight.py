"""Pre-flight checks of a Slurm profile: fail within seconds, naming the fix, before any job is queued."""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass, field

import psutil

from ..config import Profile
from . import slurmcli
from .container import check_container
from .errors import ClusterConfigError


@dataclass
class Partition:
    """A partition with the GPUs its nodes carry as GRES."""

    name: str
    default: bool = False
    state: str = "UP"
    nodes: list[str] = field(default_factory=list)
    gpus_per_node: dict[str, int] = field(default_factory=dict)
    cpus_per_node: dict[str, int] = field(default_factory=dict)

    @property
    def max_gpus_per_node(self) -> int:
        return max(self.gpus_per_node.values(), default=0)


def _fields(line: str) -> dict[str, str]:
    out = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:2,shard:8`` -> 2, 4, 2."""
    total = 0
    for item in (gres or "").split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partitions(timeout: float = 8.0) -> dict[str, Partition]:
    """Every partition with the GPUs per node of its nodes, from two scontrol calls."""
    parts: dict[str, Partition] = {}
    for line in slurmcli.run(["scontrol", "-o", "show", "partition"], timeout=timeout).splitlines():
        f = _fields(line)
        if "PartitionName" in f:
            parts[f["PartitionName"]] = Partition(f["PartitionName"], f.get("Default") == "YES", f.get("State", "UP"))
    for line in slurmcli.run(["scontrol", "-o", "show", "node"], timeout=timeout, check=False).splitlines():
        f = _fields(line)
        if "NodeName" not in f:
            continue
        for p in f.get("Partitions", "").split(","):
            if p in parts:
                parts[p].nodes.append(f["NodeName"])
                parts[p].gpus_per_node[f["NodeName"]] = gres_gpus(f.get("Gres", ""))
                cpus = f.get("CPUTot", "0")
                parts[p].cpus_per_node[f["NodeName"]] = int(cpus) if cpus.isdigit() else 0
    return parts


def check_slurm_profile(profile: Profile, gpus_per_worker: int) -> Partition:
    """Raise ClusterConfigError (naming the fix) when Slurm cannot give what the profile asks."""
    where = f"profile {profile.name!r} ({profile.source})"
    if slurmcli.which("sbatch") is None:
        raise ClusterConfigError(
            f"sbatch not found on PATH but {where} submits Slurm jobs: load your site's Slurm module "
            "(e.g. 'module load slurm'), run the lab on a login node, or use start_cluster(profile='local')"
        )
    _check_lifetime(profile, where)
    check_scheduler_interface(profile, where)
    check_container(profile, where)
    if profile.require_account and not profile.account:
        raise ClusterConfigError(
            f"{where}: this site requires a Slurm account; pass start_cluster(account='<project>') or set "
            f"'account:' under profiles.{profile.name} in your user file (list yours with: sacctmgr show assoc user=$USER)"
        )
    parts = partitions()
    if profile.partition:
        part = parts.get(profile.partition)
        if part is None:
            raise ClusterConfigError(
                f"{where}: unknown partition {profile.partition!r}; valid partitions: {', '.join(sorted(parts)) or 'none'}. "
                f"Pass start_cluster(partition=...) or fix 'partition:' in your profile."
            )
    else:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise ClusterConfigError(f"{where}: no partition given and Slurm has no default one; set 'partition:' "
                                     f"(valid: {', '.join(sorted(parts))})")
        part = defaults[0]
    if part.state != "UP":
        up = sorted(p.name for p in parts.values() if p.state == "UP")
        raise ClusterConfigError(f"{where}: partition {part.name!r} is {part.state}, so jobs there would not start; "
                                 f"use another one ({', '.join(up) or 'none is UP'}) or ask your admins")
    per_job = profile.workers_per_job
    jobs_of = f" x workers_per_job={per_job}" if per_job > 1 else ""
    max_cpus = max(part.cpus_per_node.values(), default=0)
    if part.nodes and profile.cores * per_job > max_cpus:
        raise ClusterConfigError(f"{where}: cores={profile.cores} per worker{jobs_of}, but the nodes of partition {part.name!r} "
                                 f"have at most {max_cpus} CPUs; ask cores{jobs_of}<={max_cpus}")
    if gpus_per_worker > 0:
        gpu_parts = sorted(f"{p.name} ({p.max_gpus_per_node}/node)" for p in parts.values() if p.max_gpus_per_node)
        if part.max_gpus_per_node == 0:
            raise ClusterConfigError(
                f"{where}: partition {part.name!r} has no GPU GRES on its nodes, but {gpus_per_worker} GPU(s) per worker "
                f"were asked; use a GPU partition ({', '.join(gpu_parts) or 'none on this cluster'}) or gpus_per_worker=0"
            )
        if gpus_per_worker * per_job > part.max_gpus_per_node:
            raise ClusterConfigError(
                f"{where}: {gpus_per_worker} GPUs per worker{jobs_of} asked, but the nodes of partition {part.name!r} have at most "
                f"{part.max_gpus_per_node}; ask gpus_per_worker{jobs_of}<={part.max_gpus_per_node} (more workers instead)"
            )
    return part


def host_interfaces() -> dict[str, list[str]]:
    """This host's network interfaces and their IPv4 addresses (what ``interface:`` may name)."""
    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in sorted(psutil.net_if_addrs().items())}


def check_scheduler_interface(profile: Profile, where: str) -> None:
    """The scheduler binds here: an interface this host lacks fails now, listing the ones it has."""
    name = profile.scheduler_interface or profile.interface
    if not name:
        return
    have = host_interfaces()
    if name in have and have[name]:
        return
    listing = ", ".join(f"{n} ({', '.join(a) or 'no IPv4 address'})" for n, a in have.items())
    key = "scheduler_interface" if profile.scheduler_interface else "interface"
    raise ClusterConfigError(
        f"{where}: {key}={name!r} is not a network interface with an IPv4 address on this host "
        f"({socket.gethostname()}), where the scheduler runs; its interfaces: {listing}. Set {key} to one "
        "of them (if the compute nodes name theirs differently, keep 'interface:' for them and set "
        "'scheduler_interface:' for this host)"
    )


def _check_lifetime(profile: Profile, where: str) -> None:
    """A worker lifetime (with its stagger) must end before the walltime; all three were read at load."""
    lifetime = profile.lifetime.seconds if profile.lifetime else 0
    stagger = profile.lifetime_stagger.seconds if profile.lifetime_stagger else 0
    if lifetime and profile.walltime and lifetime + stagger >= profile.walltime.seconds:
        raise ClusterConfigError(
            f"{where}: lifetime {profile.lifetime} + stagger {profile.lifetime_stagger} reaches the walltime "
            f"{profile.walltime}, so Slurm would kill workers before they retire; shorten lifetime or leave it "
            "null (labkit then retires workers 5 minutes before walltime)"
        )
    if lifetime and profile.walltime and profile.signal:
        warned_at = profile.walltime.seconds - profile.signal.lead
        if lifetime - stagger < warned_at:
            warnings.warn(
                f"{where}: workers may retire {lifetime - stagger} s into their jobs (lifetime {profile.lifetime} - "
                f"stagger {profile.lifetime_stagger}), before Slurm's warning at {warned_at} s (walltime "
                f"{profile.walltime} - signal {profile.signal}): a training run then loses a rank instead of "
                "saving and stopping. Leave lifetime null (labkit retires workers after the warning) or set it "
                f"to at least {warned_at}s plus the stagger", UserWarning, stacklevel=3)
