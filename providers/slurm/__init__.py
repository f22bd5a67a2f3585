"""The slurm provider: the HPC baseline. Each sweep point is one batch job.

Run cloudbench on the cluster's login node (a shared filesystem is assumed: the run directory, this
checkout and its interpreter are visible on the compute nodes, as on any HPC cluster). Per point it writes
an sbatch script (nodes, tasks per node, ``--gres=gpu:N`` where nodes have GPUs, time limit, partition,
account), submits it, polls squeue (reporting why a job pends), and inside the job srun starts the
Horovod ranks (providers.slurm.launch). Jobs are named ``cb-<run id>`` and carry the harness in their
comment, so teardown, Ctrl-C and ``cloudbench gc --provider slurm`` scancel exactly the run's jobs.

Options (``--option KEY=VALUE``): partition, account, time_limit (default 01:00:00), slurm_conf (sets
SLURM_CONF for every command), iface (the ranks' network interface; default the batch node hostname's),
python (the interpreter on the nodes; default this one), price_per_node_hour, currency.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from providers.errors import PlanError, PointFailed, ProviderError
from providers.base import Capabilities, Fleet, FleetSpec, Job, JobResult, Node, Offering, Resource, watch
from providers.local import ENV_TAG, harness_owner, owner_alive

log = logging.getLogger("cloudbench")
ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
PREFIX = "cb-"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}


def parse_gres_gpus(gres):
    """GPUs per node from sinfo's %G, e.g. "gpu:a100:8(S:0-1)" -> (8, "a100"); "(null)" -> (0, None)."""
    for item in re.split(r",(?![^(]*\))", gres or ""):
        m = re.match(r"gpu(?::([A-Za-z0-9_.-]+?))?:(\d+)", item)
        if m:
            return int(m.group(2)), m.group(1)
    return 0, None


class SlurmProvider:
    name = "slurm"
    description = "an HPC cluster through Slurm: one sbatch job per point, ranks started by srun"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=False, prices=False, engines=("gloo",),
                                notes="--option partition=P [account=A time_limit=HH:MM:SS slurm_conf=PATH]")

    def __init__(self, partition=None, account=None, time_limit="01:00:00", slurm_conf=None, iface=None, python=None,
                 price_per_node_hour=None, currency=None, **options):
        if time_limit and not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", str(time_limit)):
            raise PlanError("time_limit", time_limit, "a Slurm time such as 01:00:00 or 1-00:00:00")
        self.partition, self.account, self.time_limit = partition, account, time_limit
        self.slurm_conf, self.iface = slurm_conf, iface
        self.python = python or sys.executable
        try:
            self.price = None if price_per_node_hour in (None, "") else float(price_per_node_hour)
        except ValueError:
            raise PlanError("price_per_node_hour", price_per_node_hour, "a number") from None
        self.currency = currency
        self.options = options
        self.owner = harness_owner()

    # -- the slurm commands -----------------------------------------------------------------------
    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    def cmd(self, *args, check=True, timeout=60):
        try:
            p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=self.env(), timeout=timeout)
        except FileNotFoundError:
            raise ProviderError(f"`{args[0]}` not found: run cloudbench on a Slurm login node") from None
        except subprocess.TimeoutExpired:
            raise ProviderError(f"`{' '.join(map(str, args))}` did not answer within {timeout} s "
                                "(is slurmctld reachable?)") from None
        if check and p.returncode != 0:
            raise ProviderError(f"`{' '.join(map(str, args[:3]))} ...` failed: {p.stderr.strip()[-500:]}")
        return p

    # -- what it offers ---------------------------------------------------------------------------
    def nodes(self):
        """[(name, cpus, gpus, gpu_model, state)] of the partition's nodes (the default partition if unset)."""
        args = ["sinfo", "-h", "-N", "-o", "%N|%c|%G|%P|%t"] + (["-p", self.partition] if self.partition else [])
        out = []
        for line in self.cmd(*args).stdout.splitlines():
            name, cpus, gres, part, state = line.split("|")
            if not self.partition and not part.endswith("*"):
                continue  # default partition only
            gpus, model = parse_gres_gpus(gres)
            out.append((name, int(cpus), gpus, model, state.rstrip("*~#!%$@^-")))
        return out

    def offerings(self):
        nodes = self.nodes()
        if not nodes:
            raise ProviderError(f"partition {self.partition or '(default)'} has no nodes")
        name, cpus, gpus, model, _ = nodes[0]
        return [Offering(instance_type=f"slurm-{self.partition or 'default'}", gpu_model=model, gpus=gpus,
                         slots=gpus or cpus, price_per_hour=self.price, currency=self.currency if self.price else None)]

    def check(self):
        for tool in TOOLS:
            if not shutil.which(tool, path=self.env().get("PATH")):
                raise ProviderError(f"`{tool}` not found: run cloudbench on a Slurm login node (apt: slurm-client)")
        self.cmd("sinfo", "-h", "-o", "%P")

    # -- provision: nothing to buy; check the partition can hold the largest point ----------------
    def provision(self, spec: FleetSpec, on_record):
        offer = self.offerings()[0]
        usable = [n for n in self.nodes() if n[4] in ("idle", "mix", "alloc", "comp", "resv")]
        need = math.ceil(spec.slots / offer.slots)
        if need > len(usable):
            raise ProviderError(f"partition {self.partition or '(default)'} has {len(usable)} usable node(s) of "
                                f"{offer.slots} slots; the plan needs {need} for {spec.slots} ranks")
        device = "gpu" if offer.gpus else "cpu"
        nodes = tuple(Node(name=f"node{i}", address="", slots=offer.slots, device=device, gpu_model=offer.gpu_model)
                      for i in range(need))  # names are Slurm's choice, recorded per point by the trainer
        extra = (("partition", self.partition), ("cpus_per_node", usable[0][1]))
        if device == "cpu":
            extra += (("cpus_per_rank", max(1, usable[0][1] // offer.slots)),)
        fleet = Fleet(run_id=spec.run_id, provider=self.name, instance_type=offer.instance_type, nodes=nodes,
                      price_per_hour=self.price, currency=self.currency if self.price else None, engine=spec.engine,
                      extra=extra)
        on_record(fleet)
        return fleet

    def deploy(self, fleet: Fleet):
        """The trainer must import with the interpreter the jobs use. Checked here on the login node, which
        shares the filesystem with the compute nodes; an allocation just to check would queue behind the
        cluster's jobs. A node that differs shows in the first point's log."""
        probe = "import gan.train, horovod.tensorflow as h; print('ok', h.gloo_built())"
        try:
            p = subprocess.run([self.python, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                               env={**self.env(), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ProviderError(f"cannot run {self.python}: {e}") from None
        if p.returncode != 0 or "ok True" not in p.stdout:
            raise ProviderError(f"the trainer does not run with {self.python} from {ROOT} (set --option python=...): "
                                f"{(p.stderr or p.stdout).strip()[-500:]}")

    def _where(self):
        return (["--partition", self.partition] if self.partition else []) + \
               (["--account", self.account] if self.account else [])

    # -- launch: one batch job per point ----------------------------------------------------------
    def script(self, fleet: Fleet, job: Job):
        per_node = fleet.nodes[0].slots
        nodes = math.ceil(job.ranks / per_node)
        tasks_per_node = math.ceil(job.ranks / nodes)
        trainer = [self.python, "-m", job.module, *job.trainer_args, "--metrics-out", os.path.abspath(job.metrics_path)]
        if job.cpus_per_rank and fleet.device == "cpu":
            trainer += ["--cpus-per-rank", str(job.cpus_per_rank)]
        launch = [self.python, "-m", "providers.slurm.launch"] + (["--iface", self.iface] if self.iface else [])
        minutes = max(1, math.ceil(job.timeout_s / 60))
        lines = ["#!/bin/bash", f"#SBATCH --job-name={PREFIX}{job.run_id}",
                 f"#SBATCH --comment=cloudbench-owner={self.owner}",
                 f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks={job.ranks}",
                 f"#SBATCH --ntasks-per-node={tasks_per_node}",
                 f"#SBATCH --time={self.time_limit if self.time_limit else minutes}",
                 f"#SBATCH --output={os.path.abspath(job.log_path)}", "#SBATCH --open-mode=append"]
        if fleet.device == "gpu":
            lines.append(f"#SBATCH --gres=gpu:{tasks_per_node}")
        elif job.cpus_per_rank:
            lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_rank}")
        lines += [f"#SBATCH --partition={self.partition}"] if self.partition else []
        lines += [f"#SBATCH --account={self.account}"] if self.account else []
        lines += ["set -euo pipefail", f"cd {shlex.quote(str(ROOT))}",
                  f"export {ENV_TAG}={shlex.quote(job.run_id)} PYTHONPATH={shlex.quote(str(ROOT))} "
                  "TF_CPP_MIN_LOG_LEVEL=2",
                  "exec " + " ".join(shlex.quote(x) for x in launch + ["--"] + trainer)]
        return "\n".join(lines) + "\n"

    def launch(self, fleet: Fleet, job: Job, on_progress=None):
        path = os.path.splitext(job.log_path)[0] + ".sbatch"
        with open(path, "w") as f:
            f.write(self.script(fleet, job))
        t0 = time.monotonic()
        job_id = self.cmd("sbatch", "--parsable", path).stdout.strip().split(";")[0]
        status = {"state": "PENDING", "reason": ""}

        def finished():
            status["state"], status["reason"] = self._state(job_id)
            return status["state"] in DONE

        def pending():
            why = f" (pending: {status['reason']})" if status["state"] == "PENDING" else ""
            return f"Slurm job {job_id} timed out after {job.timeout_s:.0f} s in state {status['state']}{why}"

        try:
            watch(finished, job, job.log_path, on_progress, timeout_message=pending)
        finally:
            if status["state"] not in DONE:
                self.cmd("scancel", job_id, check=False)
        state = status["state"]
        code = self._exit_code(job_id)
        if state != "COMPLETED" or code != 0:
            raise PointFailed(f"Slurm job {job_id} ended {state} (exit {code}){self._failed_rank(job.log_path)}",
                              job.log_path)
        return JobResult(returncode=0, metrics_path=job.metrics_path, log_path=job.log_path,
                         seconds=time.monotonic() - t0)

    def _state(self, job_id):
        p = self.cmd("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False)
        line = p.stdout.strip()
        if p.returncode == 0 and line:
            state, _, reason = line.partition("|")
            return state, reason
        return self._scontrol(job_id).get("JobState", "COMPLETED"), ""

    def _scontrol(self, job_id):
        out = self.cmd("scontrol", "show", "job", job_id, "-o", check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def _exit_code(self, job_id):
        code = self._scontrol(job_id).get("ExitCode", "0:0")
        rc, _, sig = code.partition(":")
        return int(rc) or (128 + int(sig or 0) if int(sig or 0) else 0)

    @staticmethod
    def _failed_rank(log_path):
        try:
            text = Path(log_path).read_text(errors="replace")[-20000:]
        except OSError:
            return ""
        m = re.search(r"srun: error: (\S+): tasks? ([\d,\-]+): (.+)", text)
        return f": rank {m.group(2)} on node {m.group(1)}: {m.group(3).strip()}" if m else ""

    # -- teardown and gc --------------------------------------------------------------------------
    def _jobs(self):
        out = self.cmd("squeue", "-h", "-o", "%i|%j|%k|%T").stdout
        for line in out.splitlines():
            job_id, name, comment, state = line.split("|", 3)
            if name.startswith(PREFIX):
                yield job_id, name[len(PREFIX):], comment, state

    def teardown(self, run_id, fleet=None):
        gone = [Resource(kind="job", id=j, run_id=r, detail=f"{s} {c}") for j, r, c, s in self._jobs() if r == run_id]
        if gone:
            self.cmd("scancel", *[r.id for r in gone], check=False)
        return gone

    def list_tagged(self):
        return [Resource(kind="job", id=j, run_id=r, detail=f"{s} {c}",
                         owner_alive=owner_alive(c.rpartition("owner=")[2], unknown=True))
                for j, r, c, s in self._jobs()]

