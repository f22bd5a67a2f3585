"""The result store of one run: results/runs/<run_id>/.

  run.json          state (running/finished/interrupted/failed), pid of the harness, times, the plan
  fleet.json        the fleet record, written before anything waits on the provider
  environment.json  where the harness ran (versions, host)
  samples.parquet   one tidy row per (GPU count, repetition): measured figures or the failure
  logs/             each launch's raw output and the trainer's JSON lines
Every file is replaced atomically (write to a temporary name, then rename): a crash leaves the previous
complete version, never a half-written one.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from pathlib import Path

import pandas as pd

from providers.errors import CloudbenchError

DEFAULT_ROOT = Path("results") / "runs"

# Column order of samples.parquet (missing measurements are NaN, never 0).
COLUMNS = ["run_id", "provider", "instance_type", "gpu_model", "device", "nodes", "gpus", "repetition", "status",
           "samples_per_s", "samples_per_s_per_rank", "step_time_mean_s", "step_time_std_s", "steps", "warmup",
           "batch_size_per_rank", "variant", "precision", "engine", "price_per_hour", "currency", "hosts",
           "flops_per_sample", "tf_version", "horovod_version", "started_at", "seconds", "error", "log_path",
           "metrics_path", "grad_bytes_d", "grad_bytes_g", "link_bandwidth_Bps", "link_latency_s",
           "allreduce_bandwidth_Bps", "allreduce_latency_s", "compute_step_s", "attempts", "cpu_model", "hardware_id",
           "software_id", "heterogeneous", "steady_from", "settled", "compute_step_se_s"]
NUMERIC = ["samples_per_s", "samples_per_s_per_rank", "step_time_mean_s", "step_time_std_s", "price_per_hour",
           "flops_per_sample", "seconds", "grad_bytes_d", "grad_bytes_g", "link_bandwidth_Bps", "link_latency_s",
           "allreduce_bandwidth_Bps", "allreduce_latency_s", "compute_step_s", "attempts", "compute_step_se_s"]


def new_run_id(provider):
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{provider}-{secrets.token_hex(2)}"


def write_atomic(path, data: bytes):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStore:
    def __init__(self, directory):
        self.dir = Path(directory)
        self.run_id = self.dir.name

    @classmethod
    def create(cls, root, run_id):
        d = Path(root) / run_id
        (d / "logs").mkdir(parents=True, exist_ok=False)
        return cls(d)

    @classmethod
    def open(cls, directory):
        d = Path(directory)
        if not (d / "run.json").is_file():
            raise CloudbenchError(f"{d} is not a cloudbench run directory (no run.json)")
        return cls(d)

    # -- JSON documents -------------------------------------------------------------------------------
    def write_json(self, name, obj):
        write_atomic(self.dir / name, (json.dumps(obj, indent=1, default=str) + "\n").encode())

    def read_json(self, name, default=None):
        try:
            with open(self.dir / name) as f:
                return json.load(f)
        except FileNotFoundError:
            return default

    def update_state(self, **fields):
        doc = self.read_json("run.json", {})
        doc.update(fields)
        self.write_json("run.json", doc)
        return doc

    # -- samples -------------------------------------------------------------------------------------
    @property
    def samples_path(self):
        return self.dir / "samples.parquet"

    def samples(self) -> pd.DataFrame:
        """All rows; columns added in later versions are NaN in older runs."""
        if not self.samples_path.exists():
            return pd.DataFrame(columns=COLUMNS)
        df = pd.read_parquet(self.samples_path)
        for c in COLUMNS:
            if c not in df:
                df[c] = float("nan") if c in NUMERIC else None
            elif c in NUMERIC and df[c].dtype == object:
                df[c] = pd.to_numeric(df[c], errors="coerce")
        return df

    def add_sample(self, row: dict):
        """Append one point's row (replacing an earlier row of the same GPU count and repetition)."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown sample columns {sorted(unknown)}")
        df = self.samples()
        if len(df):
            df = df[~((df["gpus"] == row["gpus"]) & (df["repetition"] == row["repetition"]))]
        new = pd.DataFrame([{c: row.get(c) for c in COLUMNS}])
        df = new if not len(df) else pd.concat([df, new], ignore_index=True)
        df = df.astype({"gpus": "int64", "repetition": "int64", "nodes": "int64"})
        for c in NUMERIC:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        tmp = self.dir / f".samples.{os.getpid()}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.samples_path)

    def done(self):
        """(gpus, repetition) pairs measured successfully."""
        df = self.samples()
        ok = df[df["status"] == "ok"] if len(df) else df
        return {(int(g), int(r)) for g, r in zip(ok["gpus"], ok["repetition"])}

    def log_paths(self, gpus, repetition):
        base = self.dir / "logs" / f"gpus{gpus}-rep{repetition}"
        return str(base) + ".log", str(base) + ".jsonl"


def is_live(store: RunStore):
    """A run is live while its harness process exists (used by gc to spare running runs)."""
    doc = store.read_json("run.json", {})
    if doc.get("state") != "running" or not doc.get("pid"):
        return False
    try:
        os.kill(int(doc["pid"]), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


def copy_run(src, dst, overwrite=False):
    src, dst = Path(src), Path(dst)
    RunStore.open(src)
    if dst.exists():
        if not overwrite:
            raise CloudbenchError(f"{dst} exists; pass --force to replace it")
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)
    return dst
