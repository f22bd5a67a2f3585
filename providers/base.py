"""The provider interface: typed values that cross into the harness, the protocol, and the registry.

A provider turns a FleetSpec into a Fleet (provision), makes the trainer runnable on it (deploy), runs one
sweep point on it (launch), and turns it back into nothing (teardown), finding what it made by the run id
tag. Providers are found through the ``cloudbench.providers`` entry-point group; built-in ones too.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Optional, Protocol, runtime_checkable

from providers.errors import CloudbenchError

TAG = "cloudbench-run"  # every resource carries TAG=<run_id>


@dataclass(frozen=True)
class Offering:
    """An instance type a provider can supply. price_per_hour None means unknown, never 0."""

    instance_type: str
    gpu_model: Optional[str]
    gpus: int  # accelerators per instance (0: CPU only)
    slots: int  # ranks per instance (GPUs, or CPU workers where there are none)
    price_per_hour: Optional[float] = None
    currency: Optional[str] = None
    region: Optional[str] = None


@dataclass(frozen=True)
class Capabilities:
    gpus: bool
    multi_node: bool
    spot: bool
    prices: bool
    engines: tuple  # "gloo", "mpi", ...
    notes: str = ""
    local_files: bool = False  # the nodes see this machine's files (a --data path can be checked here)


@dataclass(frozen=True)
class FleetSpec:
    """What the plan asks for: enough slots for the largest sweep point."""

    run_id: str
    provider: str
    slots: int
    variant: str
    instance_type: Optional[str] = None
    engine: str = "gloo"
    options: tuple = ()  # provider-specific (key, value) pairs, e.g. (("inventory", "hosts.yaml"),)
    workdir: Optional[str] = None  # the run's results directory: providers keep run state (keys, tf state) here

    def option(self, key, default=None):
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    slots: int
    device: str  # "cpu" or "gpu"
    gpu_model: Optional[str] = None
    extra: tuple = ()  # provider-specific (key, value) pairs


@dataclass(frozen=True)
class Fleet:
    """What was provisioned; written to the run directory before waiting on anything."""

    run_id: str
    provider: str
    instance_type: str
    nodes: tuple  # of Node
    price_per_hour: Optional[float] = None  # per instance, in force at launch
    currency: Optional[str] = None
    engine: str = "gloo"
    extra: tuple = ()

    @property
    def slots(self):
        return sum(n.slots for n in self.nodes)

    @property
    def device(self):
        return self.nodes[0].device if self.nodes else "cpu"

    def placement(self, ranks):
        """[(node, ranks on it)] for a point of ``ranks`` ranks, filling nodes in order (as horovodrun -H)."""
        out, left = [], ranks
        for n in self.nodes:
            if left <= 0:
                break
            k = min(n.slots, left)
            out.append((n, k))
            left -= k
        return out

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        nodes = tuple(Node(**{**n, "extra": tuple(map(tuple, n.get("extra", ())))}) for n in d["nodes"])
        return cls(**{**d, "nodes": nodes, "extra": tuple(map(tuple, d.get("extra", ())))})


@dataclass(frozen=True)
class Job:
    """One sweep point to launch: the trainer's arguments and where its output goes."""

    run_id: str
    ranks: int
    trainer_args: tuple  # arguments after ``python -m gan.train``
    metrics_path: str  # where the trainer's JSON lines must end up on this machine
    log_path: str
    timeout_s: float
    cpus_per_rank: Optional[int] = None
    module: str = "gan.train"  # the program: the trainer, or gan.commbench (same flags for output and cores)


@dataclass(frozen=True)
class JobResult:
    returncode: int
    metrics_path: str
    log_path: str
    seconds: float
    hosts: tuple = ()


@dataclass(frozen=True)
class Resource:
    """Something a provider made and tagged: found by gc, removed by teardown."""

    kind: str
    id: str
    run_id: str
    detail: str = ""
    owner_alive: Optional[bool] = None  # the harness that made it still runs (None: unknown)


@runtime_checkable
class Provider(Protocol):
    name: str
    description: str
    capabilities: Capabilities

    def check(self) -> None: ...
    def offerings(self) -> list: ...
    def provision(self, spec: FleetSpec, on_record) -> Fleet: ...
    def deploy(self, fleet: Fleet) -> None: ...
    def launch(self, fleet: Fleet, job: Job, on_progress=None) -> JobResult: ...
    def teardown(self, run_id: str, fleet: Optional[Fleet] = None) -> list: ...
    def list_tagged(self) -> list: ...


def count_steps(path):
    """Training steps the trainer has reported so far in ``path`` (its JSON lines, or a log holding them)."""
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if '"event": "step"' in line)
    except OSError:
        return 0


def failed_rank(log_path):
    """(rank, exit code) of the first rank horovodrun (Gloo) or mpirun reports as failed in a launch's log,
    or None."""
    import re

    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()[-400:]
    except OSError:
        return None
    text = "\n".join(x for x in lines if not x.startswith("$ "))  # not our own command line
    m = re.findall(r"Process name: (\d+)\s*\nExit code: (-?\d+)", text) or \
        re.findall(r"Process (\d+) exit with status code (-?\d+)", text)
    return (int(m[0][0]), int(m[0][1])) if m else None


KILLED = {255: " (killed by a signal, or its ssh connection was lost)", 137: " (killed)", -9: " (killed)"}


def watch(finished, job: Job, progress_path, on_progress=None, interval=1.0, timeout_message=None):
    """Poll ``finished()`` until it is true, reporting the steps counted in ``progress_path``; raise
    PointFailed with ``timeout_message()`` once the job's timeout has passed. Returns the seconds waited."""
    from providers.errors import PointFailed

    t0 = time.monotonic()
    while not finished():
        if time.monotonic() - t0 > job.timeout_s:
            why = timeout_message() if timeout_message else f"timed out after {job.timeout_s:.0f} s"
            raise PointFailed(why, job.log_path)
        if on_progress:
            on_progress(count_steps(progress_path))
        time.sleep(interval)
    if on_progress:
        on_progress(count_steps(progress_path))
    return time.monotonic() - t0


GROUP = "cloudbench.providers"


def available() -> dict:
    """Provider name -> entry point, from the entry-point group."""
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP)}


def get(name: str, **options) -> Provider:
    """Instantiate the named provider; an unknown name lists the valid ones."""
    eps = available()
    if name not in eps:
        valid = ", ".join(sorted(eps)) or "none installed"
        raise CloudbenchError(f"unknown provider {name!r}; available providers: {valid}")
    return eps[name].load()(**options)
