"""The run plan: CLI flags and an optional YAML file become one validated, frozen RunPlan.

Nothing is provisioned before the plan is valid. Invalid input raises PlanError naming the field, the
value and what is allowed (the CLI exits 2).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from providers.errors import PlanError

VARIANTS = ("fixed", "angle", "small")
ENGINES = ("gloo", "mpi")
PRECISIONS = ("fp32", "bf16", "fp16")
# Per-rank batch on CPU workers when none is given: the recipe's 128 (fixed) would take minutes a step.
CPU_DEFAULT_BATCH = 8
RECIPE_BATCH = {"fixed": 128, "angle": 64, "small": 8}
# Training events per epoch in the authors' setups (90 % of 200k fixed / 400k angle events).
EPOCH_EVENTS = {"fixed": 180_000, "angle": 360_000, "small": 180_000}


@dataclass(frozen=True)
class RunPlan:
    provider: str = "local"
    gpus: Optional[int] = None  # largest point; None: every slot the provider's offering has
    sweep: tuple = ()  # GPU counts; () : powers of two up to gpus, plus gpus
    repetitions: int = 3
    variant: str = "fixed"
    batch_size: Optional[int] = None  # per rank; None: recipe on GPUs, CPU_DEFAULT_BATCH on CPU workers
    steps: int = 20
    warmup: int = 5
    data: str = "synthetic"  # or an HDF5 path on the nodes, or s3://bucket/prefix (staged onto the nodes)
    upload: Optional[str] = None  # s3://bucket/prefix: the results directory goes there when the run ends
    s3_endpoint: Optional[str] = None  # S3 endpoint for data and upload (default: boto3's)
    engine: str = "gloo"
    precision: str = "fp32"
    epoch_events: Optional[int] = None
    point_timeout_s: float = 3600.0
    retries: int = 0  # relaunches of a point whose failure the provider repaired (a replaced spot instance)
    calibrate: bool = True  # time Horovod allreduces and the busy step on the fleet for the scaling model
    ci_target: Optional[float] = None  # add repetitions until the 95 % interval's half-width / median is below
    max_repetitions: int = 10  # the most repetitions ci_target may add up to
    instance_type: Optional[str] = None
    provider_options: tuple = ()  # (key, value) pairs passed to the provider

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["sweep"] = list(self.sweep)
        d["provider_options"] = dict(self.provider_options)
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["sweep"] = tuple(d.get("sweep") or ())
        d["provider_options"] = tuple(sorted((d.get("provider_options") or {}).items()))
        return cls(**d)


FIELDS = {f.name for f in dataclasses.fields(RunPlan)}


def default_sweep(n):
    """Powers of two up to n, then n itself: 6 -> (1, 2, 4, 6)."""
    points, p = [], 1
    while p < n:
        points.append(p)
        p *= 2
    return tuple(points + [n])


def parse_sweep(value):
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [v for v in re.split(r"[,\s]+", str(value).strip()) if v]
    try:
        points = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise PlanError("sweep", value, "comma-separated positive integers, e.g. 1,2,4") from None
    if not points or any(p < 1 for p in points):
        raise PlanError("sweep", value, "comma-separated positive integers, e.g. 1,2,4")
    return tuple(sorted(set(points)))


def load_yaml(path):
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise PlanError("plan", path, f"a readable YAML file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise PlanError("plan", path, f"valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise PlanError("plan", path, "a YAML mapping of plan fields")
    doc = {k.replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise PlanError("plan field", ", ".join(unknown), "one of " + ", ".join(sorted(FIELDS)))
    return doc


def _int(field, value, minimum):
    if isinstance(value, bool):
        raise PlanError(field, value, f"an integer >= {minimum}")
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise PlanError(field, value, f"an integer >= {minimum}") from None
    if v != value and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise PlanError(field, value, f"an integer >= {minimum}")
    if v < minimum:
        raise PlanError(field, value, f"an integer >= {minimum}")
    return v


def _choice(field, value, allowed):
    if value not in allowed:
        raise PlanError(field, value, "one of " + ", ".join(allowed))
    return value


def build(file_fields=None, **flags):
    """Merge YAML fields and CLI flags (flags win; None means not given) into a validated RunPlan."""
    raw = dict(file_fields or {})
    raw.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise PlanError("plan field", ", ".join(unknown), "one of " + ", ".join(sorted(FIELDS)))
    v = {}
    v["provider"] = str(raw.get("provider", "local"))
    if raw.get("gpus") is not None:
        v["gpus"] = _int("gpus", raw["gpus"], 1)
    if raw.get("sweep"):
        v["sweep"] = parse_sweep(raw["sweep"])
        if "gpus" in v and max(v["sweep"]) > v["gpus"]:
            raise PlanError("sweep", ",".join(map(str, v["sweep"])), f"GPU counts up to --gpus {v['gpus']}")
    v["repetitions"] = _int("repetitions", raw.get("repetitions", 3), 1)
    v["retries"] = _int("retries", raw.get("retries", 0), 0)
    if not isinstance(raw.get("calibrate", True), bool):
        raise PlanError("calibrate", raw["calibrate"], "true or false")
    v["calibrate"] = raw.get("calibrate", True)
    if raw.get("ci_target") is not None:
        try:
            v["ci_target"] = float(raw["ci_target"])
        except (TypeError, ValueError):
            raise PlanError("ci-target", raw["ci_target"], "a fraction in (0, 1), e.g. 0.03") from None
        if not 0 < v["ci_target"] < 1:
            raise PlanError("ci-target", raw["ci_target"], "a fraction in (0, 1), e.g. 0.03")
    v["max_repetitions"] = _int("max-repetitions", raw.get("max_repetitions", max(10, v["repetitions"])),
                                v["repetitions"])
    v["variant"] = _choice("variant", raw.get("variant", "fixed"), VARIANTS)
    if raw.get("batch_size") is not None:
        v["batch_size"] = _int("batch-size", raw["batch_size"], 1)
    v["steps"] = _int("steps", raw.get("steps", 20), 1)
    v["warmup"] = _int("warmup", raw.get("warmup", 5), 0)
    v["data"] = str(raw.get("data") or "synthetic")
    if v["data"].startswith("s3://") or raw.get("upload"):
        from providers import objstore

        if v["data"].startswith("s3://"):
            objstore.parse(v["data"], "data")
        if raw.get("upload"):
            v["upload"] = str(raw["upload"])
            objstore.parse(v["upload"], "upload")
    if raw.get("s3_endpoint"):
        v["s3_endpoint"] = str(raw["s3_endpoint"])
        if not re.match(r"https?://[^/\s]+", v["s3_endpoint"]):
            raise PlanError("s3-endpoint", v["s3_endpoint"], "an http(s):// URL")
    v["engine"] = _choice("engine", raw.get("engine", "gloo"), ENGINES)
    v["precision"] = _choice("precision", raw.get("precision", "fp32"), PRECISIONS)
    if raw.get("epoch_events") is not None:
        v["epoch_events"] = _int("epoch-events", raw["epoch_events"], 1)
    if raw.get("point_timeout_s") is not None:
        try:
            v["point_timeout_s"] = float(raw["point_timeout_s"])
        except (TypeError, ValueError):
            raise PlanError("point-timeout-s", raw["point_timeout_s"], "seconds > 0") from None
        if v["point_timeout_s"] <= 0:
            raise PlanError("point-timeout-s", raw["point_timeout_s"], "seconds > 0")
    if raw.get("instance_type"):
        v["instance_type"] = str(raw["instance_type"])
    opts = raw.get("provider_options") or {}
    if isinstance(opts, dict):
        opts = tuple(sorted((str(k), str(val)) for k, val in opts.items()))
    v["provider_options"] = tuple(opts)
    return RunPlan(**v)


def resolve(plan: RunPlan, offering) -> RunPlan:
    """Fill what depends on the provider's offering: GPU count, sweep, batch size, epoch size."""
    slots = offering.slots
    gpus = plan.gpus if plan.gpus is not None else slots
    sweep = plan.sweep or default_sweep(gpus)
    if max(sweep) > gpus:
        raise PlanError("sweep", ",".join(map(str, sweep)), f"GPU counts up to --gpus {gpus}")
    batch = plan.batch_size or (RECIPE_BATCH[plan.variant] if offering.gpus else CPU_DEFAULT_BATCH)
    return dataclasses.replace(plan, gpus=gpus, sweep=tuple(sweep), batch_size=batch,
                               epoch_events=plan.epoch_events or EPOCH_EVENTS[plan.variant])
