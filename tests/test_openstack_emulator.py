"""The OpenStack emulator (harness.lab.emulators.openstack) as libcloud and openstacksdk see it: without a lab
(fidelity of the APIs, fault switches), and with a lab (an ACTIVE server is a lab host one can ssh into)."""
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness.lab import hosts as lab
from harness.lab.emulators.openstack import NO_VALID_HOST, OpenStackEmulator
from labcloud import emulator as control, running, until

openstack = pytest.importorskip("openstack")
from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError  # noqa: E402
from libcloud.common.types import InvalidCredsError  # noqa: E402
from libcloud.compute.providers import get_driver  # noqa: E402
from libcloud.compute.types import NodeState, Provider  # noqa: E402

# openstacksdk warns about its own deprecations (not ours to fix) on nearly every call
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:openstack",
                                        "ignore::PendingDeprecationWarning:openstack")
HOST_KEYS = "-----BEGIN SSH HOST KEY KEYS-----\n"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn3XG2Fyh7/1vQGk9m4sWzpq1H7tRj8Bsqtq3vK5Yyk someone@somewhere"


# -- helpers ----------------------------------------------------------------------------------------


def raw(url, path, method="GET", body=None, headers=None):
    """(status, JSON body, headers) of one API request."""
    req = urllib.request.Request(url + path, method=method, headers=headers or {},
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text), e.headers
        except ValueError:
            return e.code, text.decode(), e.headers


def token(emu):
    c = emu.credentials
    status, _, headers = raw(emu.url, "/identity/v3/auth/tokens", "POST", {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": c["user"], "domain": {"name": "Default"}, "password": c["password"]}}},
        "scope": {"project": {"name": c["project"], "domain": {"id": "default"}}}}})
    assert status == 201
    return headers["X-Subject-Token"]


def libcloud_driver(emu, password=None, appcred=False):
    c, cls = emu.credentials, get_driver(Provider.OPENSTACK)
    kw = {"ex_force_auth_url": emu.url + "/identity", "ex_domain_name": "Default",
          "ex_force_service_region": "RegionOne", "api_version": "2.0"}
    if appcred:
        return cls(c["app_cred_id"], c["app_cred_secret"], ex_force_auth_version="3.x_appcred", **kw)
    return cls(c["user"], password or c["password"], ex_force_auth_version="3.x_password",
               ex_tenant_name=c["project"], **kw)


def sdk(emu, password=None):
    c = emu.credentials
    return openstack.connect(auth_url=emu.auth_url, username=c["user"], password=password or c["password"],
                             project_name=c["project"], user_domain_name="Default", project_domain_name="Default",
                             region_name="RegionOne")
def node_status(driver, node):
    return driver.ex_get_node_details(node.id)


# -- without a lab ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emu():
    e = OpenStackEmulator(build_seconds=0.3).start()
    yield e
    e.stop()


@pytest.fixture
def cloud(emu):
    emu.reset()
    yield emu
    emu.reset()


def test_libcloud_full_cycle(cloud):
    t0 = time.monotonic()
    d = libcloud_driver(cloud)
    sizes = {s.name: s for s in d.list_sizes()}
    assert sizes["m1.small"].vcpus == 1 and sizes["lab.cpu"].vcpus == 2  # no lab: hosts of 2 slots
    assert d.ex_get_size_extra_specs(sizes["g1.lab"].id) == {"pci_passthrough:alias": "lab-gpu:2"}
    assert d.ex_get_size_extra_specs(sizes["bm.gpu"].id) == {"gpu_model": "V100", "gpu_count": "8"}
    # microversion 2.61 carries the extra specs in the listing (what the openstack provider asks for)
    listed = d.connection.request("/flavors/detail", headers={"X-OpenStack-Nova-API-Version": "2.61"}).object
    assert {f["name"]: f["extra_specs"] for f in listed["flavors"]}["p2.a100x4"] == {"resources:PGPU": "4"}
    images = {i.name: i for i in d.list_images()}
    assert set(images) == {"cloudbench-lab", "ubuntu-22.04"}
    nets = {n.name: n for n in d.ex_list_networks()}
    assert nets["public"].extra["router:external"] and "router:external" not in nets["lab-net"].extra
    kp = d.import_key_pair_from_string("k1", PUBKEY)
    assert kp.fingerprint.count(":") == 15 and d.get_key_pair("k1").public_key == PUBKEY
    sg = d.ex_create_security_group("g1", "cloudbench-run=t1")
    rule = d.ex_create_security_group_rule(sg, "tcp", 22, 22, cidr="10.0.0.0/8")
    assert rule.from_port == 22 and rule.ip_range == "10.0.0.0/8"
    nodes = [d.create_node(name=f"n{i}", size=sizes["m1.small"], image=images["cloudbench-lab"], ex_keyname="k1",
                           ex_security_groups=[sg], ex_metadata={"cloudbench-run": "t1"}, networks=[nets["lab-net"]])
             for i in range(2)]
    assert all(n.state == NodeState.PENDING for n in nodes)
    running = d.wait_until_running(nodes, wait_period=0.1, timeout=15, ssh_interface="private_ips")
    assert sorted(len(ips) for _, ips in running) == [1, 1]
    node = node_status(d, nodes[0])
    assert node.extra["metadata"] == {"cloudbench-run": "t1"} and node.extra["availability_zone"] == "nova"
    assert node.extra["addresses"]["lab-net"][0]["OS-EXT-IPS:type"] == "fixed" and not node.public_ips
    assert d.ex_get_metadata(node) == {"cloudbench-run": "t1"}
    # floating IP: create, attach, detach, delete
    pool = d.ex_list_floating_ip_pools()[0]
    assert pool.name == "public"
    fip = pool.create_floating_ip()
    assert fip.ip_address.startswith("198.18.0.")
    d.ex_attach_floating_ip_to_node(node, fip)
    assert node_status(d, node).public_ips == [fip.ip_address]
    assert pool.get_floating_ip(fip.ip_address).get_node_id() == node.id
    d.ex_detach_floating_ip_from_node(node, fip)
    assert node_status(d, node).public_ips == []
    assert pool.delete_floating_ip(fip)
    out = d.ex_get_console_output(node)["output"]
    assert HOST_KEYS + "ssh-ed25519 " in out and "-----END SSH HOST KEY KEYS-----" in out
    assert [p.extra["device_owner"] for p in d.ex_list_ports()] == ["compute:nova"] * 2
    for n in nodes:
        assert d.destroy_node(n)
    assert d.ex_delete_security_group(sg) and d.delete_key_pair(kp)
    assert control(cloud.url, "state")["empty"]
    assert time.monotonic() - t0 < 15


def test_libcloud_credentials(cloud):
    with pytest.raises(InvalidCredsError):
        libcloud_driver(cloud, password="wrong").list_sizes()
    assert len(libcloud_driver(cloud, appcred=True).list_sizes()) == 7
    status, body, headers = raw(cloud.url, "/compute/v2.1/servers")  # no token
    assert status == 401 and body["error"]["code"] == 401 and "Keystone uri=" in headers["WWW-Authenticate"]


def test_openstacksdk_full_cycle(cloud):
    conn = sdk(cloud)
    flavors = {f.name: f for f in conn.compute.flavors(details=True)}
    assert flavors["g2.lab"].extra_specs == {"resources:VGPU": "2"} and flavors["p1.v100x8"].vcpus == 64
    assert conn.image.find_image("cloudbench-lab").os_admin_user == "root"
    assert sorted(n.name for n in conn.network.networks()) == ["lab-net", "public"]
    assert conn.network.find_subnet("lab-subnet").cidr == "10.213.0.0/24"
    kp = conn.compute.create_keypair(name="k2")  # generated: the private key comes back once
    assert kp.private_key.startswith("-----BEGIN RSA PRIVATE KEY-----")
    sg = conn.network.create_security_group(name="g2", description="members")
    assert [r["direction"] for r in sg.security_group_rules] == ["egress", "egress"]
    conn.network.create_security_group_rule(security_group_id=sg.id, direction="ingress", remote_group_id=sg.id)
    created = conn.create_server("sdk", image="cloudbench-lab", flavor="lab.cpu", key_name="k2", network="lab-net",
                                 security_groups=["g2"], meta={"cloudbench-run": "t2"}, min_count=2, max_count=2,
                                 wait=False, auto_ip=False)
    servers = list(conn.compute.servers(name="^sdk-"))
    assert sorted(s.name for s in servers) == ["sdk-1", "sdk-2"] and created.id in {s.id for s in servers}
    for s in servers:
        conn.compute.wait_for_server(s, interval=0.1, wait=15)
    server = conn.compute.get_server(servers[0].id)
    assert server.status == "ACTIVE" and server.metadata == {"cloudbench-run": "t2"}
    assert server.flavor.vcpus == 2 and server.flavor.original_name == "lab.cpu"  # 2.47+: the flavor embedded
    assert [s.name for s in conn.compute.servers(status="ACTIVE")] and not list(conn.compute.servers(status="ERROR"))
    port = next(conn.network.ports(device_id=server.id))
    assert port.device_owner == "compute:nova" and port.security_group_ids == [sg.id]
    public = conn.network.find_network("public")
    fip = conn.network.create_ip(floating_network_id=public.id, port_id=port.id, description="cloudbench-run=t2")
    addrs = conn.compute.get_server(server.id).addresses["lab-net"]
    assert {a["OS-EXT-IPS:type"]: a["addr"] for a in addrs}["floating"] == fip.floating_ip_address
    assert [f.id for f in conn.network.ips(port_id=port.id)] == [fip.id]
    conn.network.update_ip(fip, port_id=None)
    assert conn.network.get_ip(fip.id).port_id is None
    conn.network.delete_ip(fip)
    assert HOST_KEYS in conn.compute.get_server_console_output(server)["output"]
    limits = conn.compute.get_limits().absolute
    assert (limits.instances_used, limits.total_cores_used) == (2, 4)
    assert sorted(z.name for z in conn.compute.availability_zones()) == ["az2", "nova"]
    group = conn.compute.create_server_group(name="grp", policy="anti-affinity")
    assert [g.policy for g in conn.compute.server_groups()] == ["anti-affinity"]
    conn.compute.delete_server_group(group)
    for s in servers:
        conn.compute.delete_server(s)
        conn.compute.wait_for_delete(s, interval=0.1, wait=10)
    assert not list(conn.network.ports())
    conn.network.delete_security_group(sg)
    conn.compute.delete_keypair(kp)
    assert control(cloud.url, "state")["empty"]


def test_openstacksdk_credentials(cloud):
    with pytest.raises(openstack.exceptions.SDKException, match="401"):
        sdk(cloud, password="wrong").authorize()
    c = cloud.credentials
    conn = openstack.connect(auth_type="v3applicationcredential", auth_url=cloud.auth_url,
                             application_credential_id=c["app_cred_id"],
                             application_credential_secret=c["app_cred_secret"], region_name="RegionOne")
    assert len(list(conn.compute.flavors())) == 7


def test_quota_fault_and_real_quota(cloud):
    d = libcloud_driver(cloud)
    size, image = d.ex_get_size("1"), d.list_images()[0]
    control(cloud.url, "faults", {"quota": 1})
    assert control(cloud.url, "faults")["faults"] == {"quota": 1}
    with pytest.raises(BaseHTTPError, match="Quota exceeded for instances: Requested 1, but already used 0 of 10 "
                                            "instances") as e:
        d.create_node(name="q", size=size, image=image)
    assert e.value.code == 403 and control(cloud.url, "faults")["faults"] == {}
    control(cloud.url, "quota", {"instances": 1})
    d.create_node(name="q1", size=size, image=image)
    with pytest.raises(BaseHTTPError, match="Requested 1, but already used 1 of 1 instances"):
        d.create_node(name="q2", size=size, image=image)
    limits = d.connection.request("/limits").object["limits"]["absolute"]
    assert (limits["maxTotalInstances"], limits["totalInstancesUsed"]) == (1, 1)


def test_rate_limit_then_success(cloud, monkeypatch):
    d = libcloud_driver(cloud)
    d.list_sizes()  # authenticated before the switch
    control(cloud.url, "faults", {"rate_limit": 1})
    with pytest.raises(RateLimitReachedError) as e:
        d.list_sizes()
    assert e.value.code == 429 and e.value.retry_after == 1
    control(cloud.url, "faults", {"rate_limit": 1})
    monkeypatch.setenv("LIBCLOUD_RETRY_FAILED_HTTP_REQUESTS", "1")  # libcloud then honours Retry-After
    t0 = time.monotonic()
    assert len(d.list_sizes()) == 7
    assert 0.9 < time.monotonic() - t0 < 5


def test_internal_error(cloud):
    conn = sdk(cloud)
    conn.authorize()
    control(cloud.url, "faults", {"internal_error": 1})
    with pytest.raises(openstack.exceptions.HttpException) as e:
        list(conn.network.networks())
    assert e.value.status_code == 500
    assert len(list(conn.network.networks())) == 2


def test_servers_in_error(cloud):
    d = libcloud_driver(cloud)
    image = d.list_images()[0]
    small, big = d.ex_get_size("1"), [s for s in d.list_sizes() if s.name == "p1.v100x8"][0]
    with pytest.raises(BaseHTTPError, match="Quota exceeded for cores, ram: Requested 64, 491520, but already used "
                                            "0, 0 of 20, 51200 cores, ram"):
        d.create_node(name="e0", size=big, image=image)  # quota is checked before scheduling
    control(cloud.url, "quota", {"cores": -1, "ram": -1})
    control(cloud.url, "faults", {"no_valid_host": 1, "server_error": 1})
    n1 = d.create_node(name="e1", size=small, image=image)   # takes no_valid_host
    n2 = d.create_node(name="e2", size=small, image=image)   # takes server_error
    n3 = d.create_node(name="e3", size=big, image=image)     # bigger than any host
    assert n1.state == NodeState.ERROR and n1.extra["fault"]["message"] == NO_VALID_HOST
    assert n3.state == NodeState.ERROR and n3.extra["fault"]["message"] == NO_VALID_HOST
    assert n2.state == NodeState.PENDING
    n2 = until("server_error", lambda: (lambda n: n if n.state == NodeState.ERROR else None)(node_status(d, n2)))
    assert n2.extra["fault"]["message"] == (f"Build of instance {n2.id} aborted: Failed to allocate the "
                                            "network(s), not rescheduling.")
    assert not d.ex_list_ports()  # a failed build keeps no port
    with pytest.raises(BaseHTTPError, match="is not ready"):
        d.ex_get_console_output(n1)


def test_slow_build(cloud):
    conn = sdk(cloud)
    control(cloud.url, "faults", {"slow_build": {"seconds": 1.5, "count": 1}})
    slow = conn.create_server("slow", image="cloudbench-lab", flavor="m1.small", network="lab-net", auto_ip=False)
    fast = conn.create_server("fast", image="cloudbench-lab", flavor="m1.small", network="lab-net", auto_ip=False)
    time.sleep(0.8)
    assert conn.compute.get_server(slow.id).status == "BUILD" and conn.compute.get_server(fast.id).status == "ACTIVE"
    conn.compute.wait_for_server(conn.compute.get_server(slow.id), interval=0.1, wait=5)
    control(cloud.url, "faults", {"slow_build": 30})  # seconds, until disarmed
    assert control(cloud.url, "faults")["faults"] == {"slow_build": {"seconds": 30.0, "count": None}}
    control(cloud.url, "faults", {"slow_build": 0})
    assert control(cloud.url, "faults")["faults"] == {}


def test_security_group_in_use(cloud):
    d = libcloud_driver(cloud)
    sg = d.ex_create_security_group("busy", "")
    node = d.create_node(name="u", size=d.ex_get_size("1"), image=d.list_images()[0], ex_security_groups=[sg])
    with pytest.raises(BaseHTTPError, match="in use") as e:
        d.ex_delete_security_group(sg)
    assert e.value.code == 409
    d.destroy_node(node)
    assert d.ex_delete_security_group(sg)
    default = [g for g in d.ex_list_security_groups() if g.name == "default"][0]
    with pytest.raises(BaseHTTPError, match="default security group"):
        d.ex_delete_security_group(default)


def test_microversions_and_errors(cloud):
    h = {"X-Auth-Token": token(cloud)}
    status, body, headers = raw(cloud.url, "/compute/v2.1/flavors/detail", headers=h)
    assert status == 200 and "extra_specs" not in body["flavors"][0] and body["flavors"][0]["swap"] == ""
    assert headers["OpenStack-API-Version"] == "compute 2.1"
    status, body, headers = raw(cloud.url, "/compute/v2.1/flavors/detail",
                                headers={**h, "OpenStack-API-Version": "compute 2.75"})
    assert "extra_specs" in body["flavors"][0] and body["flavors"][0]["swap"] == 0
    status, body, _ = raw(cloud.url, "/compute/v2.1/flavors", headers={**h, "OpenStack-API-Version": "compute 2.99"})
    assert status == 406 and "maximum is 2.79" in body["computeFault"]["message"]
    status, body, _ = raw(cloud.url, "/compute/v2.1/os-server-groups", "POST",
                          {"server_group": {"name": "g", "policy": "affinity"}}, headers=h)
    assert status == 400 and "'policy' was unexpected" in body["badRequest"]["message"]
    status, body, _ = raw(cloud.url, "/compute/v2.1/servers/nope", headers=h)
    assert status == 404 and body["itemNotFound"]["message"] == "Instance nope could not be found."
    status, body, _ = raw(cloud.url, "/network/v2.0/ports/nope", headers=h)
    assert status == 404 and body["NeutronError"]["type"] == "PortNotFound"
    status, body, _ = raw(cloud.url, "/compute/v2.1/servers", "POST", {"server": {
        "name": "x", "flavorRef": "1", "imageRef": next(iter(cloud.images))}},
        headers={**h, "OpenStack-API-Version": "compute 2.37"})
    assert status == 400 and "'networks' is a required property" in body["badRequest"]["message"]
    with pytest.raises(urllib.error.HTTPError):
        control(cloud.url, "faults", {"no_such_fault": 1})
    raw(cloud.url, "/compute/v2.1/os-keypairs", "POST", {"keypair": {"name": "left", "public_key": PUBKEY}}, h)
    control(cloud.url, "faults", {"rate_limit": 5})
    assert control(cloud.url, "state")["keypairs"] == ["left"]
    after = control(cloud.url, "reset", {})
    assert after["empty"] and after["faults"] == {}


# -- with a lab -------------------------------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


LAB = "ose"


@pytest.fixture(scope="module")
def oselab():
    """Lab "ose" (or, when another lab already has its subnet, "osx") with the OpenStack emulator."""
    global LAB
    lab.down(LAB)
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    LAB = next(n for n in ("ose", "osx", "osl") if f" {lab._names(n, 1)['subnet']}." not in used)
    st = lab.up(hosts=2, name=LAB, slots=1, emulate=("openstack",))
    yield st
    lab.down(LAB)


def ssh(key, known_hosts, address, *cmd):
    return subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=yes", "-o",
                           f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                           f"root@{address}", *cmd], capture_output=True, text=True, timeout=30)


class _Lab:
    """The emulator of the lab seen through the record lab.up left."""

    def __init__(self, status):
        e = status["emulators"]["openstack"]
        self.url, self.auth_url = e["url"], e["auth_url"]
        self.credentials = {"user": "cloudbench", "password": "cloudbench-lab", "project": "cloudbench"}


@needs_root
def test_lab_server_is_a_lab_host(oselab, tmp_path):
    st = lab.status(LAB)
    assert st["emulators"]["openstack"]["alive"] and st["emulators"]["openstack"]["url"].startswith("http://127.")
    state = json.loads((lab.state_dir(LAB) / "state.json").read_text())
    hosts = {h["address"]: h for h in state["hosts"]}
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True)
    emu = _Lab(st)
    d = libcloud_driver(emu)
    d.import_key_pair_from_string("labkey", (tmp_path / "key.pub").read_text())
    size = [s for s in d.list_sizes() if s.name == "lab.cpu"][0]
    assert size.vcpus == 1  # the lab hosts' slots
    image = [i for i in d.list_images() if i.name == "cloudbench-lab"][0]
    net = [n for n in d.ex_list_networks() if n.name == "lab-net"][0]
    node = d.create_node(name="vm", size=size, image=image, ex_keyname="labkey", networks=[net])
    (node, (address,)), = d.wait_until_running([node], wait_period=0.2, timeout=20, ssh_interface="private_ips")
    host = hosts[address]
    out = d.ex_get_console_output(node)["output"]
    keys = out.split("-----BEGIN SSH HOST KEY KEYS-----\n")[1].split("-----END SSH HOST KEY KEYS-----")[0]
    assert keys.strip() == (lab.state_dir(LAB) / host["name"] / "hostkey.pub").read_text().strip()
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(f"{address} {' '.join(line.split()[:2])}\n" for line in keys.splitlines() if line))
    p = ssh(tmp_path / "key", kh, address, "hostname")
    assert p.returncode == 0 and p.stdout.strip() == host["name"], p.stderr
    # a process of the "VM" dies with it; the host's sshd and the lab's own key stay
    p = ssh(tmp_path / "key", kh, address, "setsid nohup sleep 321 >/dev/null 2>&1 < /dev/null & echo $!")
    sleeper = int(p.stdout.split()[-1])
    assert running(sleeper)
    # all lab hosts taken -> the next server finds no valid host (the other host, then none)
    others = [d.create_node(name=f"more{i}", size=size, image=image, networks=[net]) for i in range(2)]
    assert others[1].state == NodeState.ERROR and others[1].extra["fault"]["message"] == NO_VALID_HOST
    d.destroy_node(node)
    assert not running(sleeper) and running(host["sshd_pid"])
    p = ssh(tmp_path / "key", kh, address, "hostname")
    assert p.returncode != 0 and "Permission denied" in p.stderr
    p = subprocess.run(lab.ssh_command(state, host, "hostname"), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == host["name"]
    for n in others:
        d.destroy_node(n)
    d.delete_key_pair(d.get_key_pair("labkey"))
    assert control(emu.url, "state")["empty"]
    assert (lab.state_dir(LAB) / host["name"] / "authorized_keys").read_text().count("\n") == 1


@needs_root
def test_lab_clouds_yaml(oselab, monkeypatch):
    clouds = lab.status(LAB)["emulators"]["openstack"]["clouds_yaml"]
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", clouds)
    conn = openstack.connect(cloud="cloudbench-lab")
    assert {f.name: f.vcpus for f in conn.compute.flavors()}["lab.cpu"] == 1
    conn = openstack.connect(cloud="cloudbench-lab-appcred")
    assert conn.network.find_network("lab-net").subnet_ids


@needs_root
def test_lab_down_stops_the_emulator(oselab):
    pid = json.loads((lab.state_dir(LAB) / "state.json").read_text())["emulators"]["openstack"]["pid"]
    with pytest.raises(lab.LabError, match="expected one of: openstack, aws, exoscale"):
        lab.up(hosts=1, name="ose2", emulate=("gce",))
    lab.down(LAB)
    assert not running(pid) and not lab.state_dir(LAB).exists()
    assert "emulators" not in lab.status(LAB)
