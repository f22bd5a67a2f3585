"""Start and stop a real OpenStack control plane for a lab (``cloudbench lab up --openstack real``).

What runs (all on 127.0.0.1, as root, each process marked with ``CLOUDBENCH_LAB_OPENSTACK=<lab>`` in its
environment so that ``lab down`` finds every one of them, workers and epmd included):

- RabbitMQ (Debian's ``rabbitmq-server``, as a plain process with its own node name, ports and data dir);
- Keystone, Placement, Glance, Neutron and the Nova API, each under uWSGI (one worker process);
- nova-conductor, nova-scheduler and one nova-compute per lab host (``nova_virt.LabHostDriver``);
- the lab's floating-IP router (``l3``: what Neutron's L3 agent would do, for lab hosts);
- PostgreSQL (Debian's, run as the postgres user with its data in the lab's state directory, password
  authentication), one database per service. SQLite was tried first: Nova's API, conductor and scheduler write the same files from three
  processes and SQLite answered "database is locked" within the first minute, even with a busy timeout.

The services come from PyPI (OpenStack 2026.2, pinned by ``lock.txt``) in a venv of their own, kept in
``CLOUDBENCH_OPENSTACK_VENV`` (default /var/cache/cloudbench-lab/openstack-<lock hash>) and reused while the lock
is unchanged. Start-up seconds and the resident memory of the whole plane go into the lab's state.

After start: projects ``service`` and ``cloudbench``, user ``cloudbench`` (member) with an application
credential, the service catalog; image ``cloudbench-lab``; flavors (``FLAVORS``: CPU ones sized to a lab host,
a vGPU one, and ones larger than any host); network ``lab-net`` on the lab's subnet, external ``public``
(198.18.X.0/24) and router ``lab-router`` between them. clouds.yaml gets ``cloudbench-lab`` (password),
``cloudbench-lab-appcred`` and ``cloudbench-lab-admin`` (for tests that set quotas).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.lab.common import LabError, signal_all

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
LOCK = HERE / "lock.txt"
MARK = "CLOUDBENCH_LAB_OPENSTACK"
REGION, DOMAIN = "RegionOne", "Default"
USER, PASSWORD, PROJECT = "cloudbench", "cloudbench-lab", "cloudbench"
SERVICES = ("keystone", "placement", "glance", "neutron", "nova")  # under uWSGI, in this order
# Flavors: (name, vcpus per host slot or absolute, ram MB, disk GB, extra specs); "s" = the lab host's slots.
FLAVORS = [("m1.small", 1, 2048, 20, {}),
           ("lab.cpu", "s", 2048, 20, {}),
           ("g2.lab", "s", 4096, 40, {"resources:VGPU": "s"}),
           ("c1.huge", 16, 32768, 100, {}),  # within the default quota (20 cores), larger than any lab host
           # Larger than any lab host: the scheduler itself answers "No valid host".
           ("p1.v100x8", 64, 491520, 500, {"pci_passthrough:alias": "nvidia-v100:8"}),
           ("p2.a100x4", 32, 245760, 500, {"resources:PGPU": "4"})]
PCI_ALIASES = [{"name": "nvidia-v100", "vendor_id": "10de", "product_id": "1db4", "device_type": "type-PCI"}]


# ------------------------------------------------------------------------------------------- install
def _stderr(message):
    print(f"[openstack] {message}", file=sys.stderr, flush=True)


def _write_private(path, text):
    """Written readable by root only: the record holds the lab's admin and service passwords."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def venv_dir() -> Path:
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    return Path(os.environ.get("CLOUDBENCH_OPENSTACK_VENV") or f"/var/cache/cloudbench-lab/openstack-{digest}")


def install(log=_stderr) -> Path:
    """The OpenStack venv (made from lock.txt when missing) and RabbitMQ (apt) ; returns the venv."""
    need = [pkg for pkg, path in (("rabbitmq-server", Path("/usr/lib/rabbitmq/bin/rabbitmq-server")),
                                  ("postgresql", None)) if (path and not path.exists()) or (not path and not pg_bin())]
    if need:
        _apt_install(need, log)
    v = venv_dir()
    done = v / ".complete"
    if not done.exists() or done.read_text() != LOCK.read_text():
        _build_venv(v, log)
    _plugins(v)
    return v


def _apt_install(packages, log):
    """apt-get install, with a policy-rc.d that keeps the packages' services from starting (the lab runs its
    own RabbitMQ and PostgreSQL; a system one started here would outlive `lab down`)."""
    log(f"installing {' '.join(packages)} (apt)")
    policy = Path("/usr/sbin/policy-rc.d")
    own = not policy.exists()
    if own:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise LabError(f"could not install {' '.join(packages)} with apt-get: {p.stderr.strip()[-400:]}")
    finally:
        if own:
            policy.unlink(missing_ok=True)


def pg_bin():
    """The newest PostgreSQL server's bin directory (Debian/Ubuntu layout), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
                   if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


def _build_venv(v, log):
    log(f"building the OpenStack venv {v} from {LOCK.name} (about 2 minutes, once)")
    shutil.rmtree(v, ignore_errors=True)
    v.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(v)], check=True)
    p = subprocess.run([str(v / "bin/pip"), "install", "-q", "--no-deps", "-r", str(LOCK)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise LabError(f"pip could not install the OpenStack lock ({LOCK}): {p.stderr.strip()[-800:]}")
    (v / ".complete").write_text(LOCK.read_text())


def _plugins(v):
    """The lab's compute and ML2 drivers, made loadable in the venv (cheap: done on every start)."""
    site = Path(subprocess.check_output([str(v / "bin/python"), "-c", "import sysconfig; "
                                         "print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # Nova loads compute drivers from nova.virt only; neutron loads ML2 drivers by entry point name.
    (site / "nova/virt/cloudbench_lab.py").write_text(
        "from harness.lab.openstack.nova_virt import LabHostDriver  # noqa: F401 (the lab's compute driver)\n")
    di = site / "cloudbench_lab_plugins-1.0.dist-info"
    di.mkdir(exist_ok=True)
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: cloudbench-lab-plugins\nVersion: 1.0\n")
    (di / "entry_points.txt").write_text(
        "[neutron.ml2.mechanism_drivers]\ncloudbench_lab = harness.lab.openstack.ml2:LabMechanismDriver\n")


# ------------------------------------------------------------------------------------------- helpers
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ini(sections) -> str:
    out = []
    for name, opts in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {v}" for k, v in opts.items()]
        out.append("")
    return "\n".join(out)


class Plane:
    """One lab's control plane: its directory, ports, processes and admin API access."""

    def __init__(self, lab_state, log=_stderr):
        self.lab = lab_state
        self.name = lab_state["name"]
        self.d = Path(lab_state["dir"]) / "openstack"
        self.log = log
        self.venv = venv_dir()
        self.rec = {"dir": str(self.d), "venv": str(self.venv), "ports": {}, "pids": {}}
        self.sessions = {}
        self.token = None

    # --- processes
    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHON", "VIRTUAL_ENV"))}
        env.update({MARK: self.name, "PATH": f"{self.venv}/bin:{env.get('PATH', '/usr/bin:/bin')}",
                    "PYTHONPATH": str(ROOT), "CLOUDBENCH_LAB_OPENSTACK_DIR": str(self.d)}, **extra)
        return env

    def run(self, *argv, what=None, **env):
        p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=self.env(**env),
                           cwd=self.d)
        if p.returncode != 0:
            raise LabError(f"{what or argv[0]} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}")
        return p.stdout

    def start(self, name, argv, **env):
        log = self.d / "log" / f"{name}.log"
        with open(log, "ab") as out:
            p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=self.env(**env), cwd=self.d, start_new_session=True)
        self.rec["pids"][name] = p.pid
        # Recorded at once, with the leader's start time: its session finds every process it forks (oslo.service
        # rewrites a worker's process title over its environment, where the mark was), even for a `lab down`
        # after this process died; the start time tells a reused pid from ours.
        self.sessions[str(p.pid)] = _start_time(p.pid)
        _write_private(self.d / "pids.json", json.dumps(self.sessions))
        return p

    def uwsgi(self, name, module, port, threads=2, **env):
        # uWSGI's HTTP router in front of the worker: it keeps clients' connections alive (keystoneauth reuses
        # them; a bare --http-socket closes each one, and the next POST on it is reset).
        return self.start(name, [self.venv / "bin/uwsgi", "--http", f"127.0.0.1:{port}", "--http-keepalive",
                                 "--module", module, "--master", "--processes", "1", "--threads", str(threads), "--lazy-apps", "--die-on-term",
                                 "--need-app", "--buffer-size", "65535", "--disable-logging", "--log-5xx",
                                 "--log-4xx"], **env)

    def wait_http(self, name, url, proc, timeout=90):
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                return
            except urllib.error.HTTPError:
                return  # it answers (401 is an answer)
            except OSError:
                pass
            if proc.poll() is not None:
                raise LabError(f"{name} exited ({proc.returncode}); its log: {self.tail(name)}")
            if time.monotonic() > deadline:
                raise LabError(f"{name} did not answer at {url} within {timeout} s; its log: {self.tail(name)}")
            time.sleep(0.2)

    def wait_log(self, name, text, proc, timeout=30):
        deadline = time.monotonic() + timeout
        while text not in self.tail(name, 100000):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"{name} did not start: {self.tail(name)}")
            time.sleep(0.1)

    def tail(self, name, n=1500):
        try:
            return (self.d / "log" / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    # --- admin API
    def url(self, service):
        return f"http://127.0.0.1:{self.rec['ports'][service]}"

    def api(self, method, url, body=None, headers=None, ok=(200, 201, 202, 204), raw=None, token=True):
        h = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if token:
            h["X-Auth-Token"] = self.token
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(url, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read()
                status, hdrs = r.status, r.headers
        except urllib.error.HTTPError as e:
            text, status, hdrs = e.read(), e.code, e.headers
        if status not in ok:
            raise LabError(f"{method} {url} answered {status}: {text[:600]!r}")
        return (json.loads(text) if text and text[:1] in (b"{", b"[") else {}), hdrs

    def login(self, user="admin", password=None, project="admin"):
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": DOMAIN}, "password": password or self.rec["admin_password"]}}},
            "scope": {"project": {"name": project, "domain": {"name": DOMAIN}}}}}
        out, hdrs = self.api("POST", self.url("keystone") + "/v3/auth/tokens", body, token=False)
        return hdrs["X-Subject-Token"], out


# ------------------------------------------------------------------------------------------- up
def up(lab_state, log=_stderr) -> dict:
    """Start the control plane for a lab whose hosts are up; returns its record (for the lab's state.json)."""
    t0 = time.monotonic()
    install(log)
    pl = Plane(lab_state, log)
    d = pl.d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    d.chmod(0o711)  # its configs hold the service password (root only); postgres must reach pg/ below it
    for sub in ("log", "lock", "images", "staging", "tasks", "keys/fernet", "keys/credential"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "faults.json").write_text("{}")
    ports = pl.rec["ports"]
    for name in ("rabbit", "rabbit_dist", "epmd", "postgres", *SERVICES):
        ports[name] = _free_port()
    pl.rec["admin_password"] = secrets.token_urlsafe(12)
    pl.rec["service_password"] = secrets.token_urlsafe(12)
    timings = pl.rec["seconds"] = {}
    try:
        _rabbit(pl)
        timings["rabbitmq"] = round(time.monotonic() - t0, 1)
        _postgres(pl)
        timings["postgres"] = round(time.monotonic() - t0, 1)
        _write_configs(pl)
        _databases(pl)
        timings["databases"] = round(time.monotonic() - t0, 1)
        _keystone(pl)
        timings["keystone"] = round(time.monotonic() - t0, 1)
        _identity(pl)
        procs = {}
        procs["placement"] = pl.uwsgi("placement", "placement.wsgi.api:application", ports["placement"],
                                      OS_PLACEMENT_CONFIG_DIR=str(d / "placement"))
        procs["glance"] = pl.uwsgi("glance", "glance.wsgi.api:application", ports["glance"],
                                   OS_GLANCE_CONFIG_DIR=str(d / "glance"))
        procs["neutron"] = pl.uwsgi("neutron", "neutron.wsgi.api:application", ports["neutron"],
                                    OS_NEUTRON_CONFIG_DIR=str(d / "neutron"),
                                    OS_NEUTRON_CONFIG_FILES="neutron.conf;ml2.ini")
        procs["nova"] = pl.uwsgi("nova-api", "nova.wsgi.osapi_compute:application", ports["nova"],
                                 OS_NOVA_CONFIG_DIR=str(d / "nova"), OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf")
        procs["conductor"] = pl.start("nova-conductor", [pl.venv / "bin/nova-conductor", "--config-file",
                                                         d / "nova/nova.conf"])
        procs["scheduler"] = pl.start("nova-scheduler", [pl.venv / "bin/nova-scheduler", "--config-file",
                                                         d / "nova/nova.conf"])
        for h in lab_state["hosts"]:
            procs[h["name"]] = pl.start(f"nova-compute-{h['name']}", [
                pl.venv / "bin/nova-compute", "--config-file", d / "nova/nova.conf", "--config-file",
                d / f"nova/compute-{h['name']}.conf"],
                CLOUDBENCH_LAB_HOST=json.dumps({**h, "dir": str(Path(lab_state["dir"]) / h["name"])}))
        for name, path in (("placement", "/"), ("glance", "/"), ("neutron", "/"), ("nova", "/")):
            pl.wait_http(name if name != "nova" else "nova-api", pl.url(name) + path, procs[name], timeout=120)
        timings["apis"] = round(time.monotonic() - t0, 1)
        _resources(pl)
        _wait_computes(pl, lab_state, procs)
        timings["computes"] = round(time.monotonic() - t0, 1)
        pl.rec["clouds_yaml"] = str(_clouds_yaml(pl))
        _write_private(d / "record.json", json.dumps(pl.rec, indent=1))
        # Floating IPs: what an L3 agent would do (it reads record.json for the admin credentials).
        l3 = pl.start("l3", [sys.executable, "-m", "harness.lab.openstack.l3", "--lab", pl.name])
        pl.wait_log("l3", "routing floating IPs", l3)
        pl.rec["start_seconds"] = round(time.monotonic() - t0, 1)
        pl.rec["rss_mb"] = round(rss(pl.name) / 2**20)
        _write_private(d / "record.json", json.dumps(pl.rec, indent=1))
    except BaseException:
        down(pl.name)
        raise
    return pl.rec


def _rabbit(pl):
    d, p = pl.d / "rabbit", pl.rec["ports"]
    d.mkdir()
    env = dict(HOME=str(d), RABBITMQ_NODENAME=f"cbl-{pl.name}@localhost", RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
               RABBITMQ_NODE_PORT=str(p["rabbit"]), RABBITMQ_DIST_PORT=str(p["rabbit_dist"]),
               ERL_EPMD_PORT=str(p["epmd"]), ERL_EPMD_ADDRESS="127.0.0.1", RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
               RABBITMQ_LOG_BASE=str(d / "log"), RABBITMQ_PID_FILE=str(d / "pid"),
               RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"), RABBITMQ_CONFIG_FILE=str(d / "rabbitmq"))
    (d / "enabled_plugins").write_text("[].\n")
    pl.rec["mq_password"] = secrets.token_urlsafe(12)
    _write_private(d / "rabbitmq.conf", f"default_user = cloudbench\ndefault_pass = {pl.rec['mq_password']}\n")
    # Erlang's distribution port on loopback too (the AMQP one is, by RABBITMQ_NODE_IP_ADDRESS).
    env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "-kernel inet_dist_use_interface {127,0,0,1}"
    pl.rabbit_env = env
    proc = pl.start("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], **env)
    deadline = time.monotonic() + 60
    while True:  # await_startup fails at once while the node has not registered with epmd yet
        p2 = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", env["RABBITMQ_NODENAME"], "--timeout", "60",
                             "await_startup"], capture_output=True, text=True, env=pl.env(**env))
        if p2.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"RabbitMQ did not start: {p2.stderr.strip()[-400:]} {pl.tail('rabbitmq')}")
        time.sleep(0.5)
    pl.rec["transport_url"] = f"rabbit://cloudbench:{pl.rec['mq_password']}@127.0.0.1:{p['rabbit']}/"


DATABASES = ("keystone", "placement", "glance", "neutron", "nova_api", "nova", "nova_cell0")


def _postgres(pl):
    """A PostgreSQL server of the lab's own (trust on 127.0.0.1, no fsync: a lab's databases are disposable)."""
    d, port, pg = pl.d / "pg", pl.rec["ports"]["postgres"], pg_bin()
    if pg is None:
        raise LabError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); apt-get install postgresql")
    d.mkdir()
    shutil.chown(d, "postgres", "postgres")
    pl.rec["db_password"] = secrets.token_urlsafe(12)
    pwfile = d / "pwfile"
    pwfile.write_text(pl.rec["db_password"] + "\n")
    pwfile.chmod(0o600)
    shutil.chown(pwfile, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    pl.run(*as_pg, pg / "initdb", "-D", d / "data", "-A", "scram-sha-256", "--pwfile", pwfile, "-U", "openstack",
           "-N", "-E", "UTF8", what="initdb")
    pwfile.unlink()
    proc = pl.start("postgres", [*as_pg, pg / "postgres", "-D", d / "data", "-k", d, "-h", "127.0.0.1",
                                 "-p", port, "-c", "fsync=off", "-c", "synchronous_commit=off",
                                 "-c", "full_page_writes=off", "-c", "max_connections=500",
                                 "-c", "shared_buffers=64MB"])
    deadline = time.monotonic() + 30
    while subprocess.run([pg / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"PostgreSQL did not start: {pl.tail('postgres')}")
        time.sleep(0.2)
    for name in DATABASES:
        pl.run(pg / "psql", "-q", "-h", "127.0.0.1", "-p", port, "-U", "openstack", "-d", "postgres",
               "-c", f"CREATE DATABASE {name}", what=f"CREATE DATABASE {name}", PGPASSWORD=pl.rec["db_password"])


def _db(pl, name):
    return f"postgresql+psycopg2://openstack:{pl.rec['db_password']}@127.0.0.1:{pl.rec['ports']['postgres']}/{name}"


def _auth(pl, user):
    return {"www_authenticate_uri": pl.url("keystone") + "/v3", "auth_url": pl.url("keystone") + "/v3",
            "auth_type": "password", "project_domain_name": DOMAIN, "user_domain_name": DOMAIN,
            "project_name": "service", "username": user, "password": pl.rec["service_password"],
            "region_name": REGION, "service_token_roles_required": "true"}


def _client(pl, user):
    return {"auth_url": pl.url("keystone") + "/v3", "auth_type": "password", "project_domain_name": DOMAIN,
            "user_domain_name": DOMAIN, "project_name": "service", "username": user,
            "password": pl.rec["service_password"], "region_name": REGION, "valid_interfaces": "public"}


def _write_configs(pl):
    d, lab = pl.d, pl.lab
    mq = {"transport_url": pl.rec["transport_url"]}
    db = lambda n: _db(pl, n)  # noqa: E731
    files = {
        "keystone/keystone.conf": {
            "DEFAULT": {"log_file": d / "log/keystone-service.log"},
            "database": {"connection": db("keystone")},
            "token": {"provider": "fernet"},
            "fernet_tokens": {"key_repository": d / "keys/fernet"},
            "credential": {"key_repository": d / "keys/credential"}},
        "placement/placement.conf": {
            "api": {"auth_strategy": "keystone"}, "keystone_authtoken": _auth(pl, "placement"),
            "placement_database": {"connection": db("placement")}},
        "glance/glance-api.conf": {
            "DEFAULT": {"enabled_backends": "fs:file", "log_file": d / "log/glance-service.log"},
            "glance_store": {"default_backend": "fs"},
            "fs": {"filesystem_store_datadir": d / "images"},
            "os_glance_staging_store": {"filesystem_store_datadir": d / "staging"},
            "os_glance_tasks_store": {"filesystem_store_datadir": d / "tasks"},
            "database": {"connection": db("glance")},
            "keystone_authtoken": _auth(pl, "glance"), "paste_deploy": {"flavor": "keystone"},
            "oslo_concurrency": {"lock_path": d / "lock"}},
        "neutron/neutron.conf": {
            "DEFAULT": {"core_plugin": "ml2", "service_plugins": "router", "auth_strategy": "keystone",
                        "notify_nova_on_port_status_changes": "false", "notify_nova_on_port_data_changes": "false",
                        "api_paste_config": d / "neutron/api-paste.ini", "log_file": d / "log/neutron-service.log",
                        "rpc_workers": 0, "rpc_state_report_workers": 0, **mq},
            "database": {"connection": db("neutron")},
            "keystone_authtoken": _auth(pl, "neutron"),
            "oslo_concurrency": {"lock_path": d / "lock"}},
        "neutron/ml2.ini": {
            "ml2": {"type_drivers": "flat,local", "tenant_network_types": "local",
                    "mechanism_drivers": "cloudbench_lab", "extension_drivers": "port_security"},
            "ml2_type_flat": {"flat_networks": "public,lab"}},
        "nova/nova.conf": {
            "DEFAULT": {"state_path": d / "nova-state", "my_ip": "127.0.0.1", "cpu_allocation_ratio": "1.0",
                        "ram_allocation_ratio": "1.0", "disk_allocation_ratio": "1.0",
                        "log_file": d / "log/nova-service.log", **mq},
            "api": {"auth_strategy": "keystone"},
            "wsgi": {"api_paste_config": d / "nova/api-paste.ini"},
            "api_database": {"connection": db("nova_api")},
            "database": {"connection": db("nova")},
            "keystone_authtoken": _auth(pl, "nova"),
            "placement": _client(pl, "placement"), "neutron": _client(pl, "neutron"),
            "glance": {"valid_interfaces": "public", "region_name": REGION},
            # Neutron's policy lets a project member delete a server's port only with Nova's service token beside.
            "service_user": {**_client(pl, "nova"), "send_service_user_token": "true"},
            "scheduler": {"discover_hosts_in_cells_interval": "2", "workers": "1", "max_attempts": "3"},
            "conductor": {"workers": "1"},
            "pci": {"alias": json.dumps(PCI_ALIASES[0])},
            "oslo_concurrency": {"lock_path": d / "lock"},
            "oslo_messaging_notifications": {"driver": "noop"}},
    }
    for h in lab["hosts"]:
        files[f"nova/compute-{h['name']}.conf"] = {
            "DEFAULT": {"host": h["name"], "compute_driver": "cloudbench_lab.LabHostDriver",
                        "state_path": d / f"nova-state/{h['name']}", "instances_path": d / f"nova-state/{h['name']}/i",
                        "log_file": d / f"log/nova-compute-{h['name']}-service.log"},
            "oslo_concurrency": {"lock_path": d / f"lock/{h['name']}"}}
    for rel, sections in files.items():
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, _ini(sections))
    for rel, src in (("nova/api-paste.ini", "etc/nova/api-paste.ini"),
                     ("neutron/api-paste.ini", "etc/neutron/api-paste.ini"),
                     ("glance/glance-api-paste.ini", "etc/glance/glance-api-paste.ini")):
        shutil.copy(pl.venv / src, d / rel)
    for h in lab["hosts"]:
        (d / f"nova-state/{h['name']}/i").mkdir(parents=True, exist_ok=True)
        (d / f"lock/{h['name']}").mkdir(parents=True, exist_ok=True)


def _databases(pl):
    d, v = pl.d, pl.venv
    nova = ["--config-file", d / "nova/nova.conf"]
    pl.run(v / "bin/keystone-manage", "--config-file", d / "keystone/keystone.conf", "db_sync", what="keystone db_sync")
    pl.run(v / "bin/placement-manage", "--config-dir", d / "placement", "db", "sync", what="placement db sync")
    pl.run(v / "bin/glance-manage", "--config-file", d / "glance/glance-api.conf", "db_sync", what="glance db_sync")
    # Neutron's migrations are MySQL's only now (ALTER TABLE ... CONVERT TO CHARACTER SET): its tables from
    # its models, as its own functional tests make them, then stamped as migrated.
    pl.run(v / "bin/python", "-c", "import sys, sqlalchemy; from neutron.db.migration.models import head; "
           "head.get_metadata().create_all(sqlalchemy.create_engine(sys.argv[1]))", _db(pl, "neutron"),
           what="neutron's tables")
    pl.run(v / "bin/neutron-db-manage", "--config-file", d / "neutron/neutron.conf", "--config-file",
           d / "neutron/ml2.ini", "stamp", "heads", what="neutron-db-manage stamp heads")
    pl.run(v / "bin/nova-manage", *nova, "api_db", "sync", what="nova-manage api_db sync")
    pl.run(v / "bin/nova-manage", *nova, "cell_v2", "map_cell0", "--database_connection",
           _db(pl, "nova_cell0"), what="nova-manage cell_v2 map_cell0")
    pl.run(v / "bin/nova-manage", *nova, "cell_v2", "create_cell", "--name", "cell1", what="nova-manage create_cell")
    pl.run(v / "bin/nova-manage", *nova, "db", "sync", what="nova-manage db sync")


def _keystone(pl):
    d, v = pl.d, pl.venv
    conf = ["--config-file", d / "keystone/keystone.conf"]
    for step in ("fernet_setup", "credential_setup"):
        pl.run(v / "bin/keystone-manage", *conf, step, "--keystone-user", "root", "--keystone-group", "root",
               what=f"keystone-manage {step}")
    url = f"http://127.0.0.1:{pl.rec['ports']['keystone']}/v3/"
    pl.run(v / "bin/keystone-manage", *conf, "bootstrap",  # the password by environment, not in `ps`
           "--bootstrap-admin-url", url, "--bootstrap-public-url", url, "--bootstrap-internal-url", url,
           "--bootstrap-region-id", REGION, what="keystone-manage bootstrap",
           OS_BOOTSTRAP_PASSWORD=pl.rec["admin_password"])
    proc = pl.uwsgi("keystone", "keystone.wsgi.api:application", pl.rec["ports"]["keystone"], threads=4,
                    OS_KEYSTONE_CONFIG_FILES=str(d / "keystone/keystone.conf"))
    pl.wait_http("keystone", url, proc)


def _identity(pl):
    """Projects, users, roles, the catalog; the cloudbench user's application credential."""
    pl.token, _ = pl.login()
    ks = pl.url("keystone") + "/v3"
    roles = {r["name"]: r["id"] for r in pl.api("GET", ks + "/roles")[0]["roles"]}
    for role in ("member", "reader", "service"):
        if role not in roles:
            roles[role] = pl.api("POST", ks + "/roles", {"role": {"name": role}})[0]["role"]["id"]
    projects = {}
    for name in ("service", PROJECT):
        projects[name] = pl.api("POST", ks + "/projects", {"project": {"name": name, "domain_id": "default"}})[0][
            "project"]["id"]
    for user in ("nova", "neutron", "glance", "placement"):
        uid = pl.api("POST", ks + "/users", {"user": {"name": user, "domain_id": "default",
                                                      "password": pl.rec["service_password"]}})[0]["user"]["id"]
        for role in ("admin", "service"):
            pl.api("PUT", f"{ks}/projects/{projects['service']}/users/{uid}/roles/{roles[role]}")
    uid = pl.api("POST", ks + "/users", {"user": {"name": USER, "domain_id": "default", "password": PASSWORD,
                                                  "default_project_id": projects[PROJECT]}})[0]["user"]["id"]
    for role in ("member", "reader"):
        pl.api("PUT", f"{ks}/projects/{projects[PROJECT]}/users/{uid}/roles/{roles[role]}")
    catalog = {"placement": ("placement", ""), "glance": ("image", ""), "neutron": ("network", ""),
               "nova": ("compute", "/v2.1")}
    for name, (kind, path) in catalog.items():
        sid = pl.api("POST", ks + "/services", {"service": {"name": name, "type": kind}})[0]["service"]["id"]
        for iface in ("public", "internal", "admin"):
            pl.api("POST", ks + "/endpoints", {"endpoint": {"service_id": sid, "interface": iface, "region_id": REGION,
                                                            "url": pl.url(name) + path}})
    pl.rec.update(project_id=projects[PROJECT], user_id=uid)
    token, _ = pl.login(USER, PASSWORD, PROJECT)
    out, _ = pl.api("POST", f"{ks}/users/{uid}/application_credentials",
                    {"application_credential": {"name": "cloudbench-lab", "secret": secrets.token_urlsafe(24)}},
                    headers={"X-Auth-Token": token}, token=False)
    c = out["application_credential"]
    pl.rec["app_cred"] = {"id": c["id"], "secret": c["secret"]}


def _resources(pl):
    """The image, flavors and networks a user's cloud would have."""
    pl.token, _ = pl.login()
    lab = pl.lab
    slots = min(int(h["slots"]) for h in lab["hosts"])
    # Glance: a tiny raw image (the "VM" is a lab host; nothing boots from it).
    gl = pl.url("glance") + "/v2/images"
    img = pl.api("POST", gl, {"name": "cloudbench-lab", "disk_format": "raw", "container_format": "bare",
                              "visibility": "public", "min_disk": 0, "min_ram": 0})[0]
    pl.api("PUT", f"{gl}/{img['id']}/file", raw=b"\0" * 4096, headers={"Content-Type": "application/octet-stream"})
    pl.rec["image_id"] = img["id"]
    # Nova: flavors (admin), from microversion 2.55 with a description.
    nv, mv = pl.url("nova") + "/v2.1", {"OpenStack-API-Version": "compute 2.61"}
    for name, vcpus, ram, disk, specs in FLAVORS:
        n = slots if vcpus == "s" else vcpus
        f = pl.api("POST", nv + "/flavors", {"flavor": {"name": name, "vcpus": n, "ram": ram * (slots if vcpus == "s" else 1),
                                                        "disk": disk}}, headers=mv)[0]["flavor"]
        if specs:
            pl.api("POST", f"{nv}/flavors/{f['id']}/os-extra_specs",
                   {"extra_specs": {k: str(slots) if v == "s" else v for k, v in specs.items()}}, headers=mv)
    # Neutron: the tenant network on the lab's subnet (servers get addresses there, outside the hosts' own),
    # the external one for floating IPs, a router between them.
    nt = pl.url("neutron") + "/v2.0"
    subnet = lab["subnet"].rsplit(".", 1)[0]
    third = subnet.split(".")[2]
    net = pl.api("POST", nt + "/networks", {"network": {
        "name": "lab-net", "project_id": pl.rec["project_id"], "provider:network_type": "flat",
        "provider:physical_network": "lab", "shared": False}})[0]["network"]
    sub = pl.api("POST", nt + "/subnets", {"subnet": {
        "name": "lab-subnet", "network_id": net["id"], "project_id": pl.rec["project_id"], "ip_version": 4,
        "cidr": lab["subnet"], "gateway_ip": subnet + ".1", "enable_dhcp": False,
        "allocation_pools": [{"start": subnet + ".100", "end": subnet + ".199"}]}})[0]["subnet"]
    pub = pl.api("POST", nt + "/networks", {"network": {
        "name": "public", "router:external": True, "provider:network_type": "flat",
        "provider:physical_network": "public", "shared": False}})[0]["network"]
    pl.api("POST", nt + "/subnets", {"subnet": {
        "name": "public-subnet", "network_id": pub["id"], "ip_version": 4, "cidr": f"198.18.{third}.0/24",
        "gateway_ip": f"198.18.{third}.1", "enable_dhcp": False}})
    router = pl.api("POST", nt + "/routers", {"router": {
        "name": "lab-router", "project_id": pl.rec["project_id"],
        "external_gateway_info": {"network_id": pub["id"]}}})[0]["router"]
    pl.api("PUT", f"{nt}/routers/{router['id']}/add_router_interface", {"subnet_id": sub["id"]})
    pl.rec.update(network_id=net["id"], public_network_id=pub["id"], router_id=router["id"])


def _wait_computes(pl, lab_state, procs, timeout=120):
    """Every lab host's nova-compute is up and mapped to the cell (the scheduler discovers them)."""
    nv = pl.url("nova") + "/v2.1"
    want = {h["name"] for h in lab_state["hosts"]}
    deadline = time.monotonic() + timeout
    while True:
        hyp = pl.api("GET", nv + "/os-hypervisors/detail", headers={"OpenStack-API-Version": "compute 2.88"})[0]
        ready = {h["service"]["host"] for h in hyp.get("hypervisors", []) if h.get("state") == "up"}
        if want <= ready:
            return
        for h in want - ready:
            if procs[h].poll() is not None:
                raise LabError(f"nova-compute of {h} exited ({procs[h].returncode}): "
                               f"{pl.tail('nova-compute-' + h)}")
        if time.monotonic() > deadline:
            raise LabError(f"nova-compute of {sorted(want - ready)} not up within {timeout} s: "
                           f"{pl.tail('nova-compute-' + sorted(want - ready)[0])}")
        time.sleep(1)


def _clouds_yaml(pl):
    import yaml

    auth_url = pl.url("keystone") + "/v3"
    def common():
        return {"region_name": REGION, "interface": "public", "identity_api_version": 3,
                "cloudbench": {"profile": "lab"}}
    def password(user, pw, project):
        return {"auth": {"auth_url": auth_url, "username": user, "password": pw, "project_name": project,
                         "user_domain_name": DOMAIN, "project_domain_name": DOMAIN}, **common()}
    from harness.lab.common import CLOUD_NAME

    doc = {"clouds": {
        CLOUD_NAME: password(USER, PASSWORD, PROJECT),
        CLOUD_NAME + "-appcred": {"auth_type": "v3applicationcredential", "auth": {
            "auth_url": auth_url, "application_credential_id": pl.rec["app_cred"]["id"],
            "application_credential_secret": pl.rec["app_cred"]["secret"]}, **common()},
        CLOUD_NAME + "-admin": password("admin", pl.rec["admin_password"], "admin")}}
    path = Path(pl.lab["dir"]) / "clouds.yaml"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- down
def _stat(pid):
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid):
    fields = _stat(pid)
    return fields[19] if fields else None


def pids(name):
    """Every live process of lab ``name``'s control plane: in the session of a process it started (whose leader,
    if alive, is still ours), marked in its environment (epmd leaves the session), or a descendant of one of those
    (PostgreSQL's backends leave the session and rewrite their environment)."""
    from harness.lab.common import state_dir

    mark = f"{MARK}={name}".encode()
    try:
        recorded = json.loads((state_dir(name) / "openstack" / "pids.json").read_text())
    except (OSError, ValueError):
        recorded = {}
    sessions = set()
    for pid, started in recorded.items():
        now = _start_time(int(pid))
        if now is None or now == started:  # the leader is gone (its session may live on) or is still ours
            sessions.add(int(pid))
    me, found, parent = os.getpid(), set(), {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        fields = _stat(p.name)
        if not fields or fields[0] == "Z":
            continue
        pid = int(p.name)
        parent[pid] = int(fields[1])
        try:
            if int(fields[3]) in sessions or mark in (p / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            pass
    grown = True
    while grown:  # and their descendants
        more = {pid for pid, pp in parent.items() if pp in found and pid not in found}
        found |= more
        grown = bool(more)
    return sorted(found)


def rss(name):
    total = 0
    for pid in pids(name):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def down(name):
    """Stop every process of the control plane (SIGTERM, SIGKILL after 10 s); safe to repeat."""
    found = pids(name)
    signal_all(found, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pids(name):
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while (left := pids(name)) and time.monotonic() < deadline:  # what forked meanwhile goes too
        signal_all(left, signal.SIGKILL)
        time.sleep(0.1)
    if left:
        raise LabError(f"processes of the lab's OpenStack survived SIGKILL: {left}")
    return len(found)


def arm_fault(lab_dir, name, count=1):
    """Make the next ``count`` spawns on the lab's computes fail (``spawn_error``)."""
    from harness.lab.emulators import labhost

    labhost.update_json_locked(Path(lab_dir) / "openstack" / "faults.json",
                               lambda faults: faults.update({name: count}))
