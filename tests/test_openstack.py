"""The openstack provider: configuration, flavor discovery, and whole runs against the OpenStack emulator
backed by lab hosts (SSH deploy and horovodrun for real), with every fault switch, kill -9 and gc.

The tests that need no fault switch run twice (the ``backend`` parameter): against the emulator and against a
real control plane (``cloudbench lab up --openstack real``: Keystone, Nova, Neutron, Glance, Placement), whose
leftovers are counted through openstacksdk. Faults the real services cannot show on demand (429, lost answers,
slow builds) stay the emulator's."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from providers.errors import PlanError
from providers.openstack import OpenStackProvider
from providers.openstack import config as osconfig
from harness.lab.common import state_dir
from harness.lab.openstack import control
from conftest import BIN
import labcloud
from labcloud import emulator, lab_cloud
from test_run_local import ROOT, cloudbench, run_ok

SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]


# -- configuration ---------------------------------------------------------------------------------
def write_clouds(tmp_path, entry, name="mycloud"):
    p = tmp_path / "clouds.yaml"
    p.write_text(yaml.safe_dump({"clouds": {name: entry}}))
    return p


def test_clouds_yaml_password_appcred_env_and_profiles(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("OS_"):
            monkeypatch.delenv(k)
    p = write_clouds(tmp_path, {"auth": {"auth_url": "https://keystone.example:5000/v3", "username": "u",
                                         "password": "p", "project_name": "gan", "user_domain_name": "Default"},
                                "region_name": "cern", "cloudbench": {"profile": "cern", "network": "CERN_NETWORK"}})
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(p))
    c = osconfig.load("mycloud")
    assert (c.auth_type, c.username, c.project_name, c.region) == ("password", "u", "gan", "cern")
    assert c.get("network") == "CERN_NETWORK" and c.get("floating_ip_pool") == "" and c.get("user") == "root"
    assert (c.cacert, c.verify, c.project_domain_id) == (None, True, "default")
    # a provider option wins over clouds.yaml, which wins over the profile
    assert osconfig.load("mycloud", {"network": "other"}).get("network") == "other"
    # application credentials, the OTC profile's endpoint per region
    write_clouds(tmp_path, {"auth_type": "v3applicationcredential",
                            "auth": {"application_credential_id": "i", "application_credential_secret": "s"},
                            "region_name": "eu-nl", "cloudbench": {"profile": "otc"}})
    c = osconfig.load("mycloud")
    assert c.auth_type == "application_credential" and c.auth_url == "https://iam.eu-nl.otc.t-systems.com/v3"
    assert c.get("floating_ip_pool") == "admin_external_net" and c.get("gpu_flavors")["p2v.16xlarge.8"]["count"] == 8
    # an openrc environment
    monkeypatch.setenv("OS_AUTH_URL", "http://127.0.0.1:5000/v3")
    for k, v in (("OS_USERNAME", "a"), ("OS_PASSWORD", "b"), ("OS_PROJECT_NAME", "c"), ("OS_REGION_NAME", "R")):
        monkeypatch.setenv(k, v)
    c = osconfig.load(None)
    assert (c.name, c.username, c.region) == ("env", "a", "R")
    # errors name what is expected
    with pytest.raises(PlanError, match="an entry of clouds.yaml"):
        osconfig.load("nope")
    write_clouds(tmp_path, {"auth": {"auth_url": "http://x/v3", "username": "u", "password": "p", "project_name": "p",
                                     "project_domain_name": "Physics"}, "cacert": "/etc/ca.pem"})
    with pytest.raises(PlanError, match="project_domain_id as well"):
        osconfig.load("mycloud")
    write_clouds(tmp_path, {"auth": {"auth_url": "http://x/v3", "username": "u", "password": "p", "project_name": "p",
                                     "project_domain_name": "Physics", "project_domain_id": "9f1"},
                            "cacert": "/etc/ca.pem", "verify": False})
    c = osconfig.load("mycloud")
    assert (c.project_domain_id, c.cacert, c.verify) == ("9f1", "/etc/ca.pem", False)
    write_clouds(tmp_path, {"auth": {"auth_url": "http://x/v3", "username": "u"}})
    with pytest.raises(PlanError, match="password"):
        osconfig.load("mycloud")
    write_clouds(tmp_path, {"auth": {"auth_url": "http://x/v3", "username": "u", "password": "p",
                                     "project_name": "p"}, "cloudbench": {"profile": "aws"}})
    with pytest.raises(PlanError, match="generic, cern, otc, lab"):
        osconfig.load("mycloud")
    with pytest.raises(PlanError, match="one of"):
        OpenStackProvider(cloud="mycloud", netwrk="x").cloud


def test_flavor_gpus_from_extra_specs_and_mapping():
    f = osconfig.flavor_gpus
    assert f("g", {"pci_passthrough:alias": "a100:8"}) == ("a100", 8)
    assert f("g", {"pci_passthrough:alias": "v100:2,v100:2"}) == ("v100", 4)
    assert f("g", {"pci_passthrough:gpu_specs": "nvidia-v100-16g:1"}) == ("nvidia-v100-16g", 1)
    assert f("g", {"resources:PGPU": "4"}) == ("PGPU", 4)
    assert f("g", {"resources:VGPU": "1", "trait:CUSTOM_NVIDIA_A10": "required"}) == ("NVIDIA_A10", 1)
    assert f("bm", {"gpu_model": "V100"}, {"bm": {"model": "V100", "count": 8}}) == ("V100", 8)
    assert f("m1.small", {"hw:cpu_policy": "dedicated"}) == (None, 0)


def test_api_listing_follows_next_links_and_restarts_when_its_marker_vanishes():
    from providers.openstack import Api, ApiError

    items = [{"id": str(i)} for i in range(7)]
    calls = []

    def get(path):  # a cloud whose page size is capped at 3, whatever limit is asked for
        calls.append(path)
        marker = path.split("marker=")[1] if "marker=" in path else None
        if marker == "2" and len(calls) == 2:
            raise ApiError("marker 2 not found", 404)  # deleted between two pages: start again
        start = 0 if marker is None else int(marker) + 1
        page = items[start:start + 3]
        links = [{"rel": "next", "href": f"http://x/v2.1/servers?marker={page[-1]['id']}"}] if start + 3 < 7 else []
        return {"servers": page, "servers_links": links}

    api = Api.__new__(Api)
    api.compute = get
    assert api.listing("compute", "/servers/detail?name=cb-", "servers") == items
    assert calls[0] == "/servers/detail?name=cb-" and calls[2] == "/servers/detail?name=cb-"
    assert calls[-1] == "/servers/detail?name=cb-&marker=5"


# -- against the emulator, backed by lab hosts -----------------------------------------------------------
@pytest.fixture(scope="module")
def cloud():
    """A 2-host lab with the OpenStack emulator; its clouds.yaml is what every test uses."""
    yield from lab_cloud("os1", "openstack")


def leftovers(cloud, run_id=None):
    """Every resource the emulator still holds (of one run when given), by kind."""
    st = emulator(cloud, "state")
    out = {}
    for kind in ("servers", "ports", "floating_ips", "security_groups", "keypairs"):
        items = st.get(kind) or []
        if run_id:
            items = [x for x in items if run_id in json.dumps(x)]
        if items:
            out[kind] = items
    return out


def use_env(monkeypatch, cloud):
    """This cloud's `cloudbench lab env` for one test: the emulator's and the real plane's labs are both up
    while the module runs (module fixtures), and each test must reach its own."""
    for k, v in cloud["env"].items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def clean(cloud, monkeypatch):
    use_env(monkeypatch, cloud)
    emulator(cloud, "reset", {})
    yield cloud
    emulator(cloud, "faults", {k: 0 for k in FAULTS})
    assert not leftovers(cloud), leftovers(cloud)


FAULTS = ("quota", "no_valid_host", "server_error", "rate_limit", "internal_error", "lost_answer", "slow_build")


class Emulated:
    """The emulator behind the backend-neutral tests."""
    kind = "emulated"

    def __init__(self, cloud):
        self.cloud = cloud

    def reset(self):
        emulator(self.cloud, "reset", {})

    def leftovers(self, run_id=None):
        return leftovers(self.cloud, run_id)

    def set_quota(self, instances):
        emulator(self.cloud, "quota", {"instances": instances})

    def fail_next_spawns(self, n):
        emulator(self.cloud, "faults", {"server_error": n})

    def slow_builds(self, n):
        emulator(self.cloud, "faults", {"slow_build": {"seconds": 60, "count": n}})

    def no_valid_host_options(self):
        emulator(self.cloud, "faults", {"no_valid_host": 1})
        return {}


class Real:
    """A real OpenStack control plane; leftovers counted through openstacksdk (admin for the project's
    resources, the run's user for its key pairs)."""
    kind = "real"

    def __init__(self, cloud):
        import openstack

        self.cloud = cloud
        self.dir = state_dir(cloud["lab"]["name"])
        self.admin = openstack.connect(cloud="cloudbench-lab-admin")
        self.user = openstack.connect(cloud="cloudbench-lab")
        self.project = self.user.current_project_id

    def reset(self):
        self.set_quota(10)
        control.arm_fault(self.dir, "spawn_error", 0)

    def leftovers(self, run_id=None):
        pid = self.project
        found = {
            "servers": [s.name for s in self.admin.compute.servers(all_projects=True, project_id=pid)],
            "ports": [p.id for p in self.admin.network.ports(project_id=pid)
                      if p.device_owner not in ("network:router_interface", "network:dhcp",
                                                "network:router_gateway")],
            "floating_ips": [f.floating_ip_address for f in self.admin.network.ips(project_id=pid)],
            "security_groups": [g.name for g in self.admin.network.security_groups(project_id=pid)
                                if g.name != "default"],
            "keypairs": [k.name for k in self.user.compute.keypairs()]}
        return {k: v for k, v in found.items() if v and (not run_id or any(run_id in str(x) for x in v)
                                                         or k == "ports")}

    def set_quota(self, instances):
        self.admin.set_compute_quotas(self.project, instances=instances)

    def fail_next_spawns(self, n):
        control.arm_fault(self.dir, "spawn_error", n)

    def slow_builds(self, n):
        pass  # real builds take seconds: long enough to interrupt

    def no_valid_host_options(self):
        return {"flavors": "c1.huge,lab.cpu"}  # larger than any host: Nova's scheduler finds no valid host


@pytest.fixture(scope="module", params=["emulated", "real"])
def backend(request):
    """The emulator, then the real control plane: each behind one 2-host lab for the module."""
    if request.param == "emulated":
        yield Emulated(request.getfixturevalue("cloud"))
    else:
        for c in lab_cloud("osr", "openstack", real=True):
            yield Real(c)


@pytest.fixture
def any_cloud(backend, monkeypatch):
    use_env(monkeypatch, backend.cloud)
    backend.reset()
    yield backend
    backend.reset()
    assert not backend.leftovers(), backend.leftovers()


def provision(run_id, tmp_path, slots=2, **options):
    p = OpenStackProvider(cloud="cloudbench-lab", **options)
    fleet, records = labcloud.provision(p, run_id, tmp_path, slots)
    return p, fleet, records


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
def test_done_when_run_on_the_cloud_leaves_nothing(any_cloud, tmp_path):
    if any_cloud.kind == "emulated":  # 90 s of suite time; the same cycle runs on the emulator in .ci/run's
        pytest.skip("the real control plane runs this cycle; the signal campaign runs it on the emulator")
    out, d, df = run_ok(tmp_path, "--provider", "openstack", "--cloud", "cloudbench-lab", "--gpus", 2, *SMALL,
                        "--repetitions", 1)  # the whole cycle; two repetitions are in the note
    assert len(df) == 2
    fleet = json.loads((d / "fleet.json").read_text())
    names = [n["name"] for n in fleet["nodes"]]
    assert names == [f"cb-{out['run_id']}-0", f"cb-{out['run_id']}-1"]
    lab = any_cloud.cloud["lab"]
    lab_hosts = {h["address"]: h["name"] for h in lab["hosts"]}
    # the trainer ran on both lab hosts (each rank records its host's own hostname)
    two = df[df["gpus"] == 2].iloc[0]
    summary = json.loads(Path(d, two["metrics_path"]).read_text().splitlines()[-1])
    assert {r["host"] for r in summary["ranks_placement"]} == set(lab_hosts.values())
    assert dict(map(tuple, fleet["extra"]))["shape"].startswith("shape 2x1")
    assert (d / "openstack" / "known_hosts").read_text().count("ssh-ed25519") == 2
    assert not any_cloud.leftovers(out["run_id"])


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@root_only
def test_floating_ips_only_when_asked_reach_the_servers_and_are_always_released(any_cloud, tmp_path):
    out, d, df = run_ok(tmp_path, "--provider", "openstack", "--cloud", "cloudbench-lab", "--option",
                        "floating_ip_pool=public", "--gpus", 2, "--sweep", 2, "--repetitions", 1, "--no-calibrate",
                        *SMALL)  # calibration is the done-when test's; here only the addresses matter
    fleet = json.loads((d / "fleet.json").read_text())
    assert all(n["address"].startswith("198.18.") for n in fleet["nodes"])  # SSH went through floating IPs
    inv = yaml.safe_load((d / "openstack" / "inventory.yaml").read_text())
    lab = any_cloud.cloud["lab"]
    internal = {h["internal_address"] for h in inv["hosts"]}
    if any_cloud.kind == "emulated":
        assert internal == {h["address"] for h in lab["hosts"]}  # Horovod used the fixed ones
    else:  # Neutron's fixed addresses, from the lab subnet's pool
        assert len(internal) == 2 and all(a.startswith(lab["subnet"].rsplit(".", 2)[0]) for a in internal)
    assert set(df["hosts"]) == {",".join(h["name"] for h in lab["hosts"])}
    assert not any_cloud.leftovers(out["run_id"])

    def routes():  # every floating IP's route goes with it (the real plane's router takes up to a second)
        return subprocess.run(["ip", "route", "show", "root", "198.18.0.0/15"], capture_output=True,
                              text=True).stdout.strip()
    labcloud.until("no floating IP route", lambda: not routes(), 10)


@root_only
def test_no_valid_host_tries_the_next_flavor_and_a_server_in_error_is_replaced(any_cloud, tmp_path):
    # Attempt 1: no valid host for the first flavor (the emulator: server 0, and server 1 abandoned with it
    # takes a server_error; the real scheduler: both); attempt 2 (the next flavor): server 0 goes ERROR and is
    # replaced. On the emulator 429s and 500s fall anywhere too.
    options = any_cloud.no_valid_host_options()
    any_cloud.fail_next_spawns(2 if any_cloud.kind == "emulated" else 1)
    if any_cloud.kind == "emulated":
        emulator(any_cloud.cloud, "faults", {"rate_limit": 3, "internal_error": 2})
    p, fleet, _ = provision("osfault1", tmp_path, **options)
    try:
        extra = dict(fleet.extra)
        first = p.shapes(2)[0][0].instance_type
        assert fleet.instance_type != first  # the first flavor had no valid host: the next one was used
        assert extra["replaced_servers"] == 1 and len(fleet.nodes) == 2
        if any_cloud.kind == "emulated":
            armed = emulator(any_cloud.cloud, "faults")["faults"]
            assert armed.get("rate_limit", 0) == armed.get("internal_error", 0) == 0  # all answered and retried
    finally:
        gone = p.teardown("osfault1", fleet)
    assert {r.kind for r in gone} >= {"server", "security_group", "keypair"}
    assert not any_cloud.leftovers()


@root_only
def test_creates_whose_answer_was_lost_are_adopted_never_made_twice(clean, tmp_path):
    emulator(clean, "faults", {"lost_answer": 1000})  # every create is carried out, then answered 504
    p, fleet, _ = provision("oslost1", tmp_path, floating_ip_pool="public")
    try:
        st = emulator(clean, "state")
        assert len(st["servers"]) == 2 and len(st["floating_ips"]) == 2 and len(st["keypairs"]) == 1
        assert [g["rules"] for g in st["security_groups"]] == [4]  # 2 egress defaults + SSH + members
        assert emulator(clean, "faults")["faults"].get("lost_answer", 0) < 1000
    finally:
        emulator(clean, "faults", {"lost_answer": 0})
        p.teardown("oslost1", fleet)
    assert not leftovers(clean)


@root_only
def test_quota_is_refused_with_the_numbers_and_nothing_is_left(any_cloud, tmp_path):
    any_cloud.set_quota(1)
    try:
        with pytest.raises(Exception, match=r"quota exceeded .* needs 2 instances, the project uses 0 of 1"):
            provision("osquota1", tmp_path)
    finally:
        any_cloud.set_quota(10)
    if any_cloud.kind == "emulated":
        emulator(any_cloud.cloud, "faults", {"quota": 1})  # Nova's own 403 on create, past the pre-check
        with pytest.raises(Exception, match="(?i)quota exceeded"):
            provision("osquota2", tmp_path)
    assert not any_cloud.leftovers()


@root_only
def test_stuck_in_build_is_replaced_then_fails_cleanly_when_replacements_run_out(clean, tmp_path):
    emulator(clean, "faults", {"slow_build": {"seconds": 60, "count": 1}})  # the first server sits in BUILD
    p, fleet, _ = provision("osslow1", tmp_path, build_timeout="4")
    try:
        assert dict(fleet.extra)["replaced_servers"] == 1
    finally:
        p.teardown("osslow1", fleet)
    emulator(clean, "faults", {"server_error": 2})
    with pytest.raises(Exception, match="more than the 1 replacements allowed"):
        provision("osslow2", tmp_path, replacements="1")
    emulator(clean, "faults", {"rate_limit": 1000})
    t0 = time.monotonic()
    with pytest.raises(Exception, match="still answers 429 after 5 s"):
        provision("osrate1", tmp_path, api_deadline="5")
    assert time.monotonic() - t0 < 30
    emulator(clean, "faults", {"rate_limit": 0})
    assert not leftovers(clean)


def start_run_in_build(backend, tmp_path):
    """A `cloudbench run` caught with its two servers created (on the emulator they sit in BUILD long enough to
    interrupt the harness there)."""
    backend.slow_builds(2)
    exe = BIN / "cloudbench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]
    proc = subprocess.Popen(cmd + ["run", "--provider", "openstack", "--cloud", "cloudbench-lab", "--gpus", "2",
                                   *SMALL, "--results", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(backend.leftovers().get("servers", [])) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    return proc


@root_only
def test_ctrl_c_during_provisioning_tears_down(any_cloud, tmp_path):
    proc = start_run_in_build(any_cloud, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    assert not any_cloud.leftovers()


@root_only
def test_kill_9_during_provisioning_then_gc_leaves_nothing(any_cloud, tmp_path):
    proc = start_run_in_build(any_cloud, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any_cloud.leftovers()["keypairs"] and any_cloud.leftovers()["security_groups"]
    if any_cloud.kind == "real":  # Nova makes the ports once it has scheduled the servers
        labcloud.until("the servers' ports", lambda: len(any_cloud.leftovers().get("ports", [])) >= 2, 60)
    dry = cloudbench("gc", "--provider", "openstack", "--cloud", "cloudbench-lab", "--results", tmp_path,
                     "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    kinds = {r["kind"] for r in json.loads(dry.stdout)["resources"]}
    assert kinds >= {"server", "port", "security_group", "keypair"}, kinds
    p = cloudbench("gc", "--provider", "openstack", "--cloud", "cloudbench-lab", "--results", tmp_path)
    assert p.returncode == 0, p.stderr
    labcloud.until("nothing left", lambda: not any_cloud.leftovers(), 60, 1)


@root_only
def test_kill_9_during_the_sweep_then_gc_leaves_nothing(any_cloud, tmp_path):
    exe = BIN / "cloudbench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]
    proc = subprocess.Popen(cmd + ["run", "--provider", "openstack", "--cloud", "cloudbench-lab", "--gpus", "2",
                                   *SMALL, "--no-calibrate", "--results", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stage():
        runs = list(tmp_path.glob("*/run.json"))
        try:
            return json.loads(runs[0].read_text()).get("stage", "") if runs else ""
        except ValueError:
            return ""
    try:
        labcloud.until("a point of the sweep", lambda: proc.poll() is not None or stage().startswith("point"), 300)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any_cloud.leftovers()["servers"]
    p = cloudbench("gc", "--provider", "openstack", "--cloud", "cloudbench-lab", "--results", tmp_path)
    assert p.returncode == 0, p.stderr
    labcloud.until("nothing left", lambda: not any_cloud.leftovers(), 60, 1)


@root_only
def test_terraform_provisioner_gets_the_cloud_settings_and_fails_cleanly_offline(clean, tmp_path):
    """terraform/openstack cannot init here (no provider plugin can be downloaded): the wiring still runs up to
    there (flavor, image, network, the run key, variables the module declares) and the failure leaves nothing."""
    with pytest.raises(Exception, match="(?i)terraform") as e:
        provision("ostf1", tmp_path, provisioner="terraform")
    tfvars = json.loads((tmp_path / "terraform" / "terraform.tfvars.json").read_text())
    p = OpenStackProvider(cloud="cloudbench-lab")
    assert tfvars["flavor"] == "lab.cpu" and tfvars["owner"]
    assert (tfvars["image"], tfvars["network"]) == (p._image().id, p._network()["id"])  # ids: names repeat
    assert tfvars["instance_count"] == 2 and tfvars["public_key"].startswith("ssh-ed25519"), tfvars
    assert "init" in str(e.value) or "provider" in str(e.value)
    assert not leftovers(clean)
