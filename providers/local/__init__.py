"""The local provider: ranks are processes on this machine (one per GPU, or one per CPU core).

Nothing is bought. Provision checks the machine has the slots; launch runs ``horovodrun --gloo`` (or
``mpirun`` with engine mpi) in its own session; every process it starts carries CLOUDBENCH_RUN=<run_id>
in its environment, which is the tag teardown and gc look for.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from providers.errors import PointFailed, ProviderError
from providers.base import (KILLED, TAG, Capabilities, Fleet, FleetSpec, Job, JobResult, Node, Offering, Resource,
                            failed_rank, watch)

ENV_TAG = "CLOUDBENCH_RUN"
ENV_OWNER = "CLOUDBENCH_OWNER"  # pid of the harness that launched the process


def local_gpus():
    """(count, model) of NVIDIA GPUs via nvidia-smi; (0, None) when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0, None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return len(names), (names[0] if names else None)


def tool(name):
    """A launcher next to this interpreter (the venv) or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


class LocalProvider:
    name = "local"
    description = "this machine: one rank per local GPU, or one per CPU core where there is none"
    capabilities = Capabilities(gpus=True, multi_node=False, spot=False, prices=False, engines=("gloo", "mpi"),
                                local_files=True,
                                notes="no cost; price is unknown (NaN) in reports")

    def __init__(self, **options):
        self.options = options

    # -- what it offers ---------------------------------------------------------------------------
    def offerings(self):
        n_gpu, model = local_gpus()
        cores = len(os.sched_getaffinity(0))
        return [Offering(instance_type=f"local-{socket.gethostname()}", gpu_model=model, gpus=n_gpu,
                         slots=n_gpu or cores, price_per_hour=None)]

    def check(self):
        if not tool("horovodrun"):
            raise ProviderError("horovodrun not found next to this Python or on PATH; run `bash harness/setup.sh`")

    # -- lifecycle --------------------------------------------------------------------------------
    def provision(self, spec: FleetSpec, on_record):
        off = self.offerings()[0]
        if spec.slots > off.slots:
            what = f"{off.gpus} GPUs" if off.gpus else f"{off.slots} CPU cores (no GPU)"
            raise ProviderError(f"this machine offers {what}; the plan needs {spec.slots} slots")
        device = "gpu" if off.gpus else "cpu"
        node = Node(name=socket.gethostname(), address="127.0.0.1", slots=off.slots, device=device,
                    gpu_model=off.gpu_model)
        from providers.netprobe import measure_tcp_link

        bw, latency = measure_tcp_link()  # Gloo's ranks talk TCP over loopback here
        fleet = Fleet(run_id=spec.run_id, provider=self.name, instance_type=off.instance_type, nodes=(node,),
                      price_per_hour=None, engine=spec.engine,
                      extra=(("link_bandwidth_Bps", bw), ("link_latency_s", latency), ("workdir", spec.workdir)))
        on_record(fleet)
        return fleet

    def deploy(self, fleet: Fleet):
        probe = "import gan.train, horovod.tensorflow as h; print(h.gloo_built(), h.mpi_built())"
        p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if p.returncode != 0:
            raise ProviderError(f"the trainer does not import here ({sys.executable}): {p.stderr.strip()[-500:]}")
        gloo, mpi = p.stdout.split()[-2:]
        if fleet.engine == "mpi" and (mpi != "True" or not tool("mpirun")):
            raise ProviderError("engine mpi needs mpirun and Horovod built with MPI; use engine gloo")

    def stage(self, fleet: Fleet, assignments):
        """Download this node's files into the run's directory (data/); returns that directory."""
        from providers import objstore

        dest = Path(dict(fleet.extra).get("workdir") or ".") / "data"
        got = objstore.fetch_here(assignments[0], dest)
        logging.getLogger("cloudbench").info("staged %d file(s), %d bytes into %s", got["files"], got["bytes"], dest)
        return str(dest)

    def command(self, fleet: Fleet, job: Job):
        trainer = [sys.executable, "-m", job.module, *job.trainer_args, "--metrics-out", job.metrics_path]
        if job.cpus_per_rank and fleet.device == "cpu":
            trainer += ["--cpus-per-rank", str(job.cpus_per_rank)]
        if fleet.engine == "mpi":
            return [tool("mpirun"), "-np", str(job.ranks), "--bind-to", "none", "--map-by", "slot",
                    "-x", ENV_TAG, "-x", "PATH", "-x", "TF_CPP_MIN_LOG_LEVEL", *trainer]
        return [tool("horovodrun"), "-np", str(job.ranks), "-H", f"localhost:{job.ranks}", "--gloo", *trainer]

    def launch(self, fleet: Fleet, job: Job, on_progress=None):
        cmd = self.command(fleet, job)
        env = {**os.environ, ENV_TAG: job.run_id, ENV_OWNER: str(os.getpid()), "TF_CPP_MIN_LOG_LEVEL": "2",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        t0 = time.monotonic()
        with open(job.log_path, "ab") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
            try:
                watch(lambda: proc.poll() is not None, job, job.metrics_path, on_progress, interval=0.5)
            finally:
                if proc.poll() is None:
                    kill_group(proc)
                    self.teardown(job.run_id)
        failed = failed_rank(job.log_path) if proc.returncode else None
        if failed:
            rank, code = failed
            raise PointFailed(f"rank {rank} on host {fleet.nodes[0].name} (this machine) exited with code {code}"
                              f"{KILLED.get(code, '')}", job.log_path)
        return JobResult(returncode=proc.returncode, metrics_path=job.metrics_path, log_path=job.log_path,
                         seconds=time.monotonic() - t0, hosts=(fleet.nodes[0].name,))

    def teardown(self, run_id, fleet=None):
        """Stop every process tagged with this run (idempotent: nothing left is success)."""
        gone = []
        for res in self.list_tagged():
            if res.run_id == run_id:
                terminate(int(res.id))
                gone.append(res)
        return gone

    def list_tagged(self):
        found = []
        me = os.getpid()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            tags = dict(item.split(b"=", 1) for item in env if b"=" in item)
            run_id = tags.get(ENV_TAG.encode())
            if run_id is None:
                continue
            owner = tags.get(ENV_OWNER.encode(), b"").decode()
            found.append(Resource(kind="process", id=pid, run_id=run_id.decode(), detail=f"{TAG} {cmdline[:120]}",
                                  owner_alive=alive(int(owner)) if owner.isdigit() else None))
        return found


def kill_group(proc, grace_s=5.0):
    """SIGTERM the launcher's whole session, then SIGKILL what is left after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def terminate(pid, grace_s=3.0):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def harness_owner():
    """This harness as the owner recorded on what it makes elsewhere (leases, jobs, cloud resources)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner, unknown=None):
    """Whether the harness ``owner`` (host:pid) still runs: checked on this machine, True for another
    machine's harness (not ours to judge), ``unknown`` when no owner was recorded."""
    if not owner:
        return unknown
    host, _, pid = str(owner).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return alive(int(pid))


def alive(pid):
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
