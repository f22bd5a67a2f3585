"""The signal campaign: SIGINT (or kill -9, then `cloudbench gc`) delivered to `cloudbench run` at chosen moments
on every provider the lab serves; prints provider x phase -> exit code, seconds to exit, leftovers.

    python -m harness.bench.signals [--providers local,ssh,...] [--phases provision,...] [--kill9] [--json-out F]

Needs root (the lab). It starts one lab with every emulator and a Slurm cluster, runs each cell, and takes
them down. The moments are picked from what the run itself records, never by sleeping at random:

- ``provision``: inside the provisioning API call (the emulator holds the create call's answer back and says
  so); on providers without an API (local, ssh, slurm, terraform), when run.json's stage is ``provision``;
- ``deploy``: run.json's stage is ``deploy``;
- ``launch``: the first point's stage has begun and the trainer has not reported a step yet;
- ``mid-point``: the trainer has reported a step (kubernetes: inside a held GET of the point's pods, the
  moment of the issue's reproduction);
- ``between-points``: the first point's sample has been stored;
- ``teardown``: a first SIGINT mid-point, a second inside a held teardown call (API providers) or 50 ms behind
  the first (the others' teardowns last milliseconds): reported, ignored, the teardown finishes.

Then a dying worker (``worker`` rows): mid-point, rank 1's node dies as it would on that infrastructure (the
cloud deletes or terminates the instance, the pod is deleted, the trainer process is killed); the point must
fail within WORKER_BOUND_S naming the node, the run must end by itself, and nothing may be left.

Leftovers are counted through each backend (the emulators' own state, boto3, the Kubernetes client, squeue,
lease files, /proc), never through cloudbench; processes are any on this machine (the lab hosts share its
process table) whose command line or environment names the run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness.bench import machine_line

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("provision", "deploy", "launch", "mid-point", "between-points", "teardown")
PROVIDERS = ("local", "ssh", "slurm", "terraform", "openstack", "aws", "exoscale", "kubernetes")
RUN = ("--variant", "small", "--steps", "30", "--warmup", "3", "--gpus", "2", "--sweep", "2", "--repetitions", "2", "--no-progress",
       "--no-calibrate")
EXIT_BOUND_S = 30.0  # a first signal must end the run (torn down) within this
WORKER_BOUND_S = 120.0  # a point whose worker died must fail within this
HOLD_S = 60.0  # a held API answer: far longer than the moment needs


def cloudbench_cmd():
    exe = Path(sys.executable).with_name("cloudbench")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]


# --------------------------------------------------------------------------------------- the backends
def emulator_call(url, path, body=None):
    """GET (or POST body to) /_emulator/<path> of a lab emulator at ``url``; its JSON answer."""
    base = url[:-len("/v2")] if url.endswith("/v2") else url
    req = urllib.request.Request(base + "/_emulator/" + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


class Backend:
    """One provider on the lab: its command-line arguments, its leftovers, where an API call can be held."""

    name = ""
    hold = None  # (method, path regex, body regex) of the provisioning call to hold, or None (no API)
    hold_mid = None  # the same for an API call made while a point runs
    hold_down = None  # the same for a teardown call (so that a second signal lands inside teardown)

    def __init__(self, lab, slurm=None):
        self.lab, self.slurm = lab, slurm

    @property
    def url(self):
        return self.lab["emulators"][self.name]["url"]

    def args(self):
        return ["--provider", self.name]

    def gc_args(self):
        return ["--provider", self.name]

    def leftovers(self, run_id) -> list:
        return []

    def arm(self, rule, seconds=HOLD_S):
        method, path, body = rule
        emulator_call(self.url, "hold", {"method": method, "path": path, "body": body, "seconds": seconds, "count": 1})

    def holding(self):
        return emulator_call(self.url, "hold").get("holding", 0) > 0

    def kill_worker(self, run_id, fleet):
        """Make the node of rank 1 die mid-point, as its kind of infrastructure would; returns its names.
        Default: the trainer process of rank 1 is killed (a crashed or OOM-killed worker), once it runs."""
        deadline = time.monotonic() + 60
        while not _rank_pids(run_id, rank=1) and time.monotonic() < deadline:
            time.sleep(0.1)
        names = []
        for pid in _rank_pids(run_id, rank=1):
            try:  # where the launcher says the rank runs (Slurm's node name, Horovod's host name)
                env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if b"=" in kv)
                names += [env[k].decode() for k in (b"SLURMD_NODENAME", b"CLOUDBENCH_NODE_NAME") if k in env]
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        node = fleet["nodes"][min(1, len(fleet["nodes"]) - 1)]
        return [node["name"], node["address"], *names]

    def disarm(self):
        if self.hold or self.hold_mid or self.hold_down:
            emulator_call(self.url, "hold", {})


def _rank_pids(run_id, rank):
    tag, want = f"CLOUDBENCH_RUN={run_id}".encode(), f"HOROVOD_RANK={rank}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env, cmd = (d / "environ").read_bytes().split(b"\0"), (d / "cmdline").read_bytes()
            except OSError:
                continue
            if tag in env and want in env and b"gan.train" in cmd and not cmd.startswith(b"/bin/sh"):
                out.append(int(d.name))
    return out


def _leases(lab, run_id):
    d = Path(lab["inventory"]).parent / "leases"
    return [f"lease {p.name}" for p in d.glob("*.lease") if run_id in p.read_text()] if d.is_dir() else []


class Local(Backend):
    name = "local"

    def args(self):
        return ["--provider", "local"]


class Ssh(Backend):
    name = "ssh"

    def args(self):
        return ["--provider", "ssh", "--inventory", self.lab["inventory"]]

    gc_args = args

    def leftovers(self, run_id):
        return _leases(self.lab, run_id)


class Terraform(Ssh):
    name = "terraform"

    def args(self):
        return ["--provider", "terraform", "--option", "module=lab", "--inventory", self.lab["inventory"]]

    def gc_args(self):
        return ["--provider", "terraform", "--inventory", self.lab["inventory"]]


class Slurm(Backend):
    name = "slurm"

    def args(self):
        return ["--provider", "slurm", "--option", f"slurm_conf={self.slurm['conf']}",
                "--option", f"partition={self.slurm['partition']}"]

    gc_args = args

    def leftovers(self, run_id):
        p = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                           env={**os.environ, "SLURM_CONF": self.slurm["conf"]})
        return [f"slurm job {line}" for line in p.stdout.splitlines() if run_id in line]


class OpenStack(Backend):
    name = "openstack"
    hold = ("POST", r"/servers/?$", "")
    hold_down = ("DELETE", r"/servers/[^/]+$", "")

    def args(self):
        return ["--provider", "openstack", "--cloud", "cloudbench-lab"]

    gc_args = args

    def leftovers(self, run_id):
        st = emulator_call(self.url, "state")
        return [f"{kind} {json.dumps(x)[:80]}" for kind, items in st.items() if isinstance(items, list)
                for x in items if run_id in json.dumps(x)]


    def kill_worker(self, run_id, fleet):  # the cloud deletes the server (openstacksdk, not cloudbench)
        import openstack

        conn = openstack.connect(cloud="cloudbench-lab")
        node = fleet["nodes"][1]
        for srv in conn.compute.servers(name=f"^{node['name']}$"):
            conn.compute.delete_server(srv.id)
        return [node["name"], node["address"]]


class Exoscale(OpenStack):
    name = "exoscale"
    hold = ("POST", r"/v2/instance/?$", "")
    hold_down = ("DELETE", r"/v2/instance/[^/]+$", "")

    def args(self):
        return ["--provider", "exoscale"]

    def kill_worker(self, run_id, fleet):  # the zone deletes the instance (a signed API v2 call)
        from providers.exoscale import ExoscaleProvider

        api, node = ExoscaleProvider().api, fleet["nodes"][1]
        for i in api.call("GET", "/instance").get("instances", []):
            if i.get("name") == node["name"]:
                api.call("DELETE", f"/instance/{i['id']}")
        return [node["name"], node["address"]]

    gc_args = args


class Aws(Backend):
    name = "aws"

    def kill_worker(self, run_id, fleet):  # the cloud terminates the instance
        import boto3

        ec2, node = boto3.client("ec2"), fleet["nodes"][1]
        found = ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": [node["name"]]},
                                                {"Name": "tag:cloudbench-run", "Values": [run_id]}])
        ids = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
        ec2.terminate_instances(InstanceIds=ids)
        return [node["name"], node["address"]]
    hold = ("POST", r"^/", r"Action=RunInstances")
    hold_down = ("POST", r"^/", r"Action=TerminateInstances")

    def leftovers(self, run_id):
        import boto3

        ec2 = boto3.client("ec2")
        tag = [{"Name": "tag:cloudbench-run", "Values": [run_id]}]
        out = [f"instance {i['InstanceId']} {i['State']['Name']}"
               for r in ec2.describe_instances(Filters=tag)["Reservations"] for i in r["Instances"]
               if i["State"]["Name"] != "terminated"]
        out += [f"key pair {k['KeyName']}" for k in ec2.describe_key_pairs(Filters=tag)["KeyPairs"]]
        out += [f"security group {g['GroupId']}" for g in ec2.describe_security_groups(Filters=tag)["SecurityGroups"]]
        out += [f"placement group {g['GroupName']}"
                for g in ec2.describe_placement_groups(Filters=tag)["PlacementGroups"]]
        return out


class Kubernetes(Backend):
    name = "kubernetes"

    def kill_worker(self, run_id, fleet):  # a worker pod is deleted (evicted, node drained)
        from kubernetes import client, config

        core = client.CoreV1Api(config.new_client_from_config(os.environ["KUBECONFIG"]))
        pods = [p for p in core.list_pod_for_all_namespaces(label_selector=f"cloudbench-run={run_id}").items
                if "worker" in p.metadata.name]
        victim = sorted(pods, key=lambda p: p.metadata.name)[-1]
        core.delete_namespaced_pod(victim.metadata.name, victim.metadata.namespace, grace_period_seconds=0)
        return [victim.metadata.name, victim.spec.node_name or "?"]
    hold = ("GET", r"labelSelector=cloudbench-run", "")  # provision first lists what a dead harness left
    hold_mid = ("GET", r"/namespaces/[^/]+/pods(\?|$)", "")  # the issue's reproduction: SIGINT inside this
    hold_down = ("GET", r"labelSelector=cloudbench-run", "")  # teardown lists the run's objects first

    def leftovers(self, run_id):
        from kubernetes import client, config

        api = config.new_client_from_config(os.environ["KUBECONFIG"])
        core, custom, sel = client.CoreV1Api(api), client.CustomObjectsApi(api), f"cloudbench-run={run_id}"
        out = []
        for kind, lister in (("pod", core.list_pod_for_all_namespaces),
                             ("service", core.list_service_for_all_namespaces),
                             ("configmap", core.list_config_map_for_all_namespaces),
                             ("secret", core.list_secret_for_all_namespaces)):
            out += [f"{kind} {o.metadata.name}" for o in lister(label_selector=sel).items]
        for version in ("v2beta1", "v1"):
            try:
                jobs = custom.list_cluster_custom_object("kubeflow.org", version, "mpijobs", label_selector=sel)
            except client.ApiException:
                continue
            out += [f"mpijob {j['metadata']['name']}" for j in jobs.get("items", [])]
        return out


BACKENDS = {b.name: b for b in (Local, Ssh, Slurm, Terraform, OpenStack, Aws, Exoscale, Kubernetes)}


def agents() -> set:
    """PIDs of orphaned per-launch ssh-agents (cb-agent-*: they hold a key and carry no run id): whose parent
    died, as a harness killed with -9 would leave them. Live ones belong to a running harness or emulator."""
    out = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"cb-agent-" in (d / "cmdline").read_bytes():
                state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z" and ppid == "1":
                    out.add(int(d.name))
        except OSError:
            pass
    return out


def processes(run_id) -> list:
    """Processes on this machine whose command line or environment names the run (lab hosts included)."""
    me, out = os.getpid(), []
    key = run_id.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if key in cmd or key in env:
            text = cmd.replace(b"\0", b" ").decode(errors="replace")
            out.append(f"pid {d.name}: {text[:100]}")
    return out


# ------------------------------------------------------------------------------------------- one cell
def _stage(run_dir):
    try:
        return json.loads((run_dir / "run.json").read_text()).get("stage") or ""
    except (OSError, ValueError):
        return ""


ORDER = ("", "check", "provision", "deploy", "calibrate", "point", "teardown", "torn down")


def _order(run_dir):
    stage = _stage(run_dir)
    return next((i for i, name in enumerate(ORDER) if name and stage.startswith(name)), 0)


def _steps(run_dir):
    n = 0
    for f in list((run_dir / "logs").glob("gpus*.log")) + list((run_dir / "logs").glob("gpus*.jsonl")):
        try:
            n += f.read_text(errors="replace").count('"event": "step"')
        except OSError:
            pass
    return n


def _failed(run_dir):
    """The error of the first failed point, or ''."""
    f = run_dir / "samples.parquet"
    if not f.exists():
        return ""
    import pandas as pd

    try:
        df = pd.read_parquet(f)
    except Exception:  # noqa: BLE001 (being written)
        return ""
    bad = df[df["status"] != "ok"]
    return str(bad.iloc[0]["error"]) if len(bad) else ""


def _trainer_running(run_id):
    return any("gan.train" in p for p in processes(run_id))


def _samples(run_dir):
    f = run_dir / "samples.parquet"
    if not f.exists():
        return 0
    import pandas as pd

    try:
        return int((pd.read_parquet(f)["status"] == "ok").sum())
    except Exception:  # noqa: BLE001 (being written: not yet)
        return 0


def _until(what, fn, proc, timeout):
    deadline = time.monotonic() + timeout
    while not fn():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)  # stages can be short: poll tightly


def moment(backend, phase, run_dir, proc):
    """Block until the run is at ``phase``."""
    at_point = lambda: _stage(run_dir).startswith("point")  # noqa: E731
    if phase == "provision":
        if not backend.hold:  # no API call to hold: the first moment the run is seen (its check or provision)
            _until("stage check or provision", lambda: _order(run_dir) >= 1, proc, 120)
    elif phase == "deploy":  # a deploy with nothing to do (kubernetes: the image) may pass unseen: then just after
        _until("stage deploy", lambda: _order(run_dir) >= 3, proc, 300)
    elif phase == "launch":  # the launcher is starting the ranks; none runs the trainer yet
        _until("the first point", at_point, proc, 600)
    elif phase in ("mid-point", "teardown"):  # the ranks run the trainer (its steps, where they stream back)
        _until("the first point's trainer", lambda: at_point() and (
            _steps(run_dir) > 0 or _trainer_running(run_dir.name)), proc, 600)
        if backend.hold_mid and phase == "mid-point":  # not for teardown: a mid-point call still held there
            backend.arm(backend.hold_mid)                # would pass for the teardown's, and two signals sent
                                                         # before Python runs its handler are delivered as one
            _until("an API call during the point to be held", backend.holding, proc, 120)
    elif phase == "between-points":
        _until("the first point's sample", lambda: _samples(run_dir) >= 1, proc, 900)


def cell(backend, phase, results, how="sigint"):
    """One run interrupted at ``phase``: a row of the campaign's table."""
    row = {"provider": backend.name, "phase": phase, "how": how, "landed": None, "exit": None, "seconds": None,
           "leftovers": [], "processes": [], "kept_points": 0, "ok": False, "note": ""}
    before = {p.name for p in Path(results).glob("*")}
    agents_before = agents()
    if phase == "provision" and backend.hold:
        backend.arm(backend.hold)
    proc = subprocess.Popen([*cloudbench_cmd(), "run", *backend.args(), *RUN, "--results", str(results)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    run_dir = None
    try:
        if phase == "provision" and backend.hold:  # held inside provision(), the run directory exists by then
            _until("the provisioning call to be held", backend.holding, proc, 120)
        _until("the run directory", lambda: {p.name for p in Path(results).glob("*")} - before, proc, 60)
        run_dir = Path(results) / sorted({p.name for p in Path(results).glob("*")} - before)[0]
        moment(backend, phase, run_dir, proc)
        if phase == "teardown" and backend.hold_down:
            backend.arm(backend.hold_down, seconds=5)
        t0 = time.monotonic()
        if how == "worker":
            names = backend.kill_worker(run_dir.name, json.loads((run_dir / "fleet.json").read_text()))
            row["landed"] = f"{_stage(run_dir)}: killed {names[0]}"
            _until("the point to fail", lambda: _failed(run_dir), proc, WORKER_BOUND_S)
            row["seconds"] = round(time.monotonic() - t0, 2)
            err_text = _failed(run_dir)
            row["names_host"] = any(n and n in err_text for n in names)
            if not row["names_host"]:
                row["note"] = f"the point's error does not name {names}: {err_text[:200]}"
            proc.wait(timeout=900)
            row["exit"] = proc.returncode
        elif how == "kill9":
            os.kill(proc.pid, signal.SIGKILL)
            row["landed"] = _stage(run_dir)
            proc.wait()
        else:
            proc.send_signal(signal.SIGINT)
            row["landed"] = _stage(run_dir)
            if phase == "teardown":
                if backend.hold_down:  # inside a teardown call, for certain
                    _until("a teardown call to be held", lambda: _order(run_dir) >= ORDER.index("teardown")
                           and backend.holding(), proc, EXIT_BOUND_S)
                    row["landed"] += " + teardown call"
                else:  # teardowns without an API call last milliseconds: right behind the first signal
                    time.sleep(0.05)
                    row["landed"] += " + 50 ms"
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=EXIT_BOUND_S * 4)
        if how != "worker":
            row["seconds"] = round(time.monotonic() - t0, 2)
            row["exit"] = proc.returncode
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        row["note"] = str(e)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
        backend.disarm()
    run_id = run_dir.name if run_dir else None
    if run_id and how == "kill9":
        g = subprocess.run([*cloudbench_cmd(), "gc", *backend.gc_args(), "--results", str(results)],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        if g.returncode != 0:
            row["note"] += f" gc exit {g.returncode}: {g.stderr.strip()[-300:]}"
    if run_id:
        deadline = time.monotonic() + 10  # processes signalled by the teardown may take a moment to go
        while True:
            row["leftovers"], row["processes"] = backend.leftovers(run_id), processes(run_id)
            row["processes"] += [f"pid {p}: an orphaned ssh-agent" for p in agents() - agents_before]
            if not (row["leftovers"] or row["processes"]) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        row["kept_points"] = _samples(run_dir)
        state = json.loads((run_dir / "run.json").read_text()).get("state") if (run_dir / "run.json").exists() else None
        row["state"] = state
    if how == "worker":  # the point failed in bound naming the node, the run ended by itself, nothing left
        why = [w for w, bad in ((f"exit {row['exit']}, not 0 or 1", row["exit"] not in (0, 1)),
                                (f"took more than {WORKER_BOUND_S} s", (row["seconds"] or 0) > WORKER_BOUND_S),
                                ("leftovers", row["leftovers"] or row["processes"])) if bad]
        if why and not row["note"]:
            row["note"] = "; ".join(why)
        row["ok"] = not row["note"]
        if not row["ok"]:
            row["stderr"] = err[-1500:]
        return row
    expected = -signal.SIGKILL if how == "kill9" else 130
    bound = EXIT_BOUND_S * (2 if phase == "teardown" else 1)
    why = [w for w, bad in (
        (f"exit {row['exit']}, not {expected}", row["exit"] != expected),
        ("leftovers", row["leftovers"] or row["processes"]),
        (f"took more than {bound} s", how != "kill9" and (row["seconds"] or 0) > bound),
        ("no finished point kept", phase == "between-points" and row["kept_points"] < 1),
        ("the second signal was not reported", phase == "teardown" and how == "sigint" and backend.hold_down
         and "ignored while the fleet is torn down" not in err)) if bad]
    if why and not row["note"]:
        row["note"] = "; ".join(why)
    row["ok"] = not row["note"]
    if not row["ok"]:
        row["stderr"] = err[-1500:]
    return row


# -------------------------------------------------------------------------------------- the campaign
class Lab:
    """One lab with every emulator and a Slurm cluster, its `lab env` in this process's environment."""

    def __init__(self, name="sig", emulate=("openstack", "aws", "exoscale", "kubernetes"), slurm=True):
        self.name, self.emulate, self.with_slurm = name, emulate, slurm

    def __enter__(self):
        from harness.lab import hosts
        from harness.lab import slurm

        hosts.down(self.name)
        self.state = hosts.up(hosts=2, name=self.name, slots=1, emulate=self.emulate)
        self.env = hosts.env(self.name)
        self._old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.slurm = None
        if self.with_slurm:
            slurm.down(self.name[:3])
            self.slurm = slurm.up(nodes=2, name=self.name[:3], cpus=1)
        return self

    def __exit__(self, *exc):
        from harness.lab import hosts
        from harness.lab import slurm

        if self.with_slurm:
            slurm.down(self.name[:3])
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hosts.down(self.name)

    def backend(self, name):
        return BACKENDS[name](self.state, self.slurm)


def table(rows) -> str:
    lines = [f"{'provider':<11}{'phase':<15}{'how':<7}{'exit':>5}{'seconds':>9}{'kept':>6}  leftovers / processes"]
    for r in rows:
        left = "; ".join(r["leftovers"] + r["processes"]) or "none"
        lines.append(f"{r['provider']:<11}{r['phase']:<15}{r['how']:<7}{str(r['exit']):>5}"
                     f"{'-' if r['seconds'] is None else format(r['seconds'], '.1f'):>9}{r['kept_points']:>6}  "
                     f"{left[:70]}{'' if r['ok'] else '  FAILED ' + r['note'][:200]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.bench.signals", description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--kill9", default="provision,mid-point",
                    help="phases at which kill -9 (then cloudbench gc) is also tried (default provision,mid-point)")
    ap.add_argument("--no-worker", dest="worker", action="store_false",
                    help="skip the dying-worker cell (rank 1's node dies mid-point, as the provider's kind would)")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    machine = machine_line()
    print(machine, flush=True)
    rows = []
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="cb-signals-") as results:
        for name in args.providers.split(","):
            b = lab.backend(name)
            for phase in args.phases.split(","):
                rows.append(cell(b, phase, results))
                print(table(rows[-1:]).splitlines()[1], flush=True)
            for phase in filter(None, args.kill9.split(",")):
                rows.append(cell(b, phase, results, how="kill9"))
                print(table(rows[-1:]).splitlines()[1], flush=True)
            if args.worker:
                rows.append(cell(b, "mid-point", results, how="worker"))
                print(table(rows[-1:]).splitlines()[1], flush=True)
    text = machine + "\n" + table(rows)
    print("\n" + text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
