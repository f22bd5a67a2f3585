"""The Exoscale emulator (harness.lab.emulators.exoscale) as the official `exoscale` client sees it, a second
implementation of the EXO2-HMAC-SHA256 signature against it, its fault switches, and (as root) an instance
that is a lab host serving the host key its user-data brought."""
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
import requests

from harness.lab import hosts as lab
from harness.lab.emulators.exoscale import ExoscaleEmulator
from labcloud import emulator, until

v2 = pytest.importorskip("exoscale.api.v2")
from exoscale.api.exceptions import (  # noqa: E402
    ExoscaleAPIAuthException, ExoscaleAPIClientException, ExoscaleAPIServerException)

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn3XG2Fyh7/1vQGk9m4sWzpq1H7tRj8Bsqtq3vK5Yyk someone@somewhere"


# -- helpers ----------------------------------------------------------------------------------------
def control(emu, path, body=None):
    return emulator(emu.url, path, body)


def client(emu, secret=None, key=None):
    c = emu.credentials
    return v2.Client(key or c["key"], secret or c["secret"], url=emu.url)

def finished(c, op):
    """The operation once it is no longer pending."""
    return until("operation " + op["id"], lambda: (lambda o: o if o["state"] != "pending" else None)(
        c.get_operation(id=op["id"])))


def by_name(items, name):
    return next(x for x in items if x["name"] == name)


def gpu_type(c, family, size):
    return next(t for t in c.list_instance_types()["instance-types"] if t["family"] == family and t["size"] == size)


def new_instance(c, name="vm", family="standard", size="small", **kw):
    tpl = by_name(c.list_templates(visibility="private")["templates"], "cloudbench-lab")
    return c.create_instance(name=name, instance_type={"id": gpu_type(c, family, size)["id"]},
                             template={"id": tpl["id"]}, disk_size=20, **kw)


def signature(method, url, body, key, secret, expires):
    """A second implementation of EXO2-HMAC-SHA256, written from the scheme (not from the emulator's code)."""
    path, _, query = url.partition("?")
    path = "/" + path.split("://", 1)[1].split("/", 1)[1]
    args = {}
    for pair in filter(None, query.split("&")):
        k, _, v = pair.partition("=")
        args.setdefault(k, []).append(v)
    names = sorted(args)
    text = f"{method} {path}\n".encode() + body + b"\n" + "".join(
        args[n][0] for n in names if len(args[n]) == 1).encode() + b"\n\n" + str(expires).encode()
    mac = base64.b64encode(hmac.new(secret.encode(), text, hashlib.sha256).digest()).decode()
    extra = f",signed-query-args={';'.join(names)}" if names else ""
    return f"EXO2-HMAC-SHA256 credential={key}{extra},expires={expires},signature={mac}"


# -- without a lab ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emu():
    e = ExoscaleEmulator(build_seconds=0.2).start()
    yield e
    e.stop()


@pytest.fixture
def cloud(emu, monkeypatch):
    monkeypatch.setattr(v2, "_sleep", lambda start: time.sleep(0.05))  # client.wait polls every 3 s otherwise
    emu.reset()
    yield emu
    emu.reset()


def test_official_client_full_cycle(cloud):
    c = client(cloud)
    assert [z["name"] for z in c.list_zones()["zones"]] == ["ch-gva-2"]
    types = c.list_instance_types()["instance-types"]
    small = by_name([{**t, "name": f"{t['family']}.{t['size']}"} for t in types], "standard.small")
    assert small["cpus"] == 2 and small["memory"] == 2 << 30 and "gpus" not in small and small["authorized"]
    g = gpu_type(c, "gpu2", "medium")
    assert g["gpus"] == 2 and "ch-gva-2" in g["zones"] and c.get_instance_type(id=g["id"]) == g
    public = c.list_templates(visibility="public")["templates"]
    ubuntu = by_name(public, "Linux Ubuntu 22.04 LTS 64-bit")
    assert ubuntu["default-user"] == "ubuntu" and c.get_template(id=ubuntu["id"])["name"] == ubuntu["name"]
    assert [t["name"] for t in c.list_templates(visibility="private")["templates"]] == ["cloudbench-lab"]

    op = c.register_ssh_key(name="cb-r1-key", public_key=PUBKEY)
    assert op["state"] == "success" and op["reference"]["command"] == "get-ssh-key"
    key = c.get_ssh_key(name="cb-r1-key")
    assert len(key["fingerprint"].split(":")) == 16 and c.list_ssh_keys()["ssh-keys"] == [key]
    op = c.create_security_group(name="cb-r1", description="run r1")
    sg = c.get_security_group(id=op["reference"]["id"])
    assert sg["name"] == "cb-r1" and op["reference"]["link"] == f"/v2/security-group/{sg['id']}"
    c.add_rule_to_security_group(id=sg["id"], flow_direction="ingress", protocol="tcp", start_port=22,
                                 end_port=22, network="0.0.0.0/0", description="ssh")
    c.add_rule_to_security_group(id=sg["id"], flow_direction="ingress", protocol="all",
                                 security_group={"id": sg["id"]})
    rules = c.get_security_group(id=sg["id"])["rules"]
    assert [(r["protocol"], r.get("start-port"), r.get("network"), (r.get("security-group") or {}).get("id"))
            for r in rules] == [("tcp", 22, "0.0.0.0/0", None), ("all", None, None, sg["id"])]

    user_data = base64.b64encode(b"#cloud-config\nruncmd: [true]\n").decode()
    op = new_instance(c, name="cb-r1-0", ssh_key={"name": "cb-r1-key"}, security_groups=[{"id": sg["id"]}],
                      labels={"cloudbench-run": "r1"}, user_data=user_data, public_ip_assignment="inet4")
    assert op["state"] == "pending" and op["reference"]["command"] == "get-instance"
    iid = op["reference"]["id"]
    inst = c.get_instance(id=iid)
    assert inst["state"] == "starting" and inst["public-ip"].startswith("10.213.1.")
    done = c.wait(op["id"])
    assert done["state"] == "success" and done["reference"]["id"] == iid
    inst = c.get_instance(id=iid)
    assert inst["state"] == "running" and inst["labels"] == {"cloudbench-run": "r1"}
    assert inst["ssh-key"]["name"] == "cb-r1-key" and inst["security-groups"] == [{"id": sg["id"]}]
    assert inst["instance-type"]["id"] == small["id"] and inst["template"]["id"]
    assert inst["created-at"].endswith("Z") and inst["user-data"] == user_data and inst["disk-size"] == 20
    assert [i["id"] for i in c.list_instances()["instances"]] == [iid]
    assert c.list_instances(ip_address=inst["public-ip"])["instances"][0]["id"] == iid
    assert c.get_quota(entity="instance") == {"resource": "instance", "usage": 1, "limit": 20}
    state = control(cloud, "state")
    assert not state["empty"] and state["hosts"] == {inst["public-ip"]: iid}

    with pytest.raises(ExoscaleAPIClientException, match="409"):
        c.delete_security_group(id=sg["id"])  # refused while the instance uses it
    op = c.delete_instance(id=iid)
    assert c.wait(op["id"])["state"] == "success"
    with pytest.raises(ExoscaleAPIClientException, match='404.*"Instance not found"'):
        c.get_instance(id=iid)
    for r in rules:
        c.delete_rule_from_security_group(id=sg["id"], rule_id=r["id"])
    c.delete_security_group(id=sg["id"])
    c.delete_ssh_key(name="cb-r1-key")
    after = control(cloud, "state")
    assert after["empty"] and after["hosts"] == {} and after["faults"] == {}
    assert [g["name"] for g in c.list_security_groups()["security-groups"]] == ["default"]


def test_credentials_are_checked(cloud):
    with pytest.raises(ExoscaleAPIAuthException, match='403.*"Invalid request signature"'):
        client(cloud, secret="wrong").list_instances()
    with pytest.raises(ExoscaleAPIAuthException, match="Invalid request signature"):
        client(cloud, key="EXOsomeoneelse").list_instance_types()
    assert client(cloud, secret="wrong").list_zones()["zones"]  # the client sends list-zones unsigned


def test_second_signature_implementation(cloud):
    c = cloud.credentials

    def call(method, path, query=None, body=None, expires=None, secret=None):
        url = cloud.url + path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else b""
        auth = signature(method, url, data, c["key"], secret or c["secret"], expires or int(time.time()) + 60)
        return requests.request(method, url, data=data or None, timeout=10,
                                headers={"Authorization": auth, "Content-Type": "application/json"})

    r = call("GET", "/template", {"visibility": "private", "family": "other"})
    assert r.status_code == 200 and [t["name"] for t in r.json()["templates"]] == ["cloudbench-lab"]
    r = call("POST", "/ssh-key", body={"name": "handmade", "public-key": PUBKEY})
    assert r.status_code == 200 and r.json()["state"] == "success"
    assert call("GET", "/ssh-key/handmade").json()["name"] == "handmade"
    r = call("GET", "/ssh-key", expires=int(time.time()) - 5)
    assert r.status_code == 403 and r.json() == {"message": "Request has expired"}
    r = call("GET", "/ssh-key", secret="nope")
    assert r.status_code == 403 and r.json() == {"message": "Invalid request signature"}
    # a query argument changed after signing
    url = cloud.url + "/template?visibility=private"
    auth = signature("GET", url, b"", c["key"], c["secret"], int(time.time()) + 60)
    r = requests.get(cloud.url + "/template?visibility=public", headers={"Authorization": auth}, timeout=10)
    assert r.status_code == 403
    r = requests.get(cloud.url + "/instance", timeout=10)
    assert r.status_code == 401 and "Authorization" in r.json()["message"]
    assert call("DELETE", "/ssh-key/handmade").status_code == 200


def test_quota_fault_and_real_quotas(cloud):
    c = client(cloud)
    control(cloud, "faults", {"quota": 1})
    with pytest.raises(ExoscaleAPIAuthException, match="403.*Quota exceeded for resource instance"):
        new_instance(c)
    assert control(cloud, "state")["empty"]
    control(cloud, "quota", {"instance": 1, "gpu": 2})
    quotas = {q["resource"]: q for q in c.list_quotas()["quotas"]}
    assert quotas["instance"]["limit"] == 1 and quotas["gpu"] == {"resource": "gpu", "usage": 0, "limit": 2}
    with pytest.raises(ExoscaleAPIAuthException, match="Quota exceeded for resource gpu"):
        new_instance(c, family="gpu2", size="large")  # 3 GPUs
    op = new_instance(c, family="gpu2", size="medium")
    assert c.get_quota(entity="gpu")["usage"] == 2 and c.get_quota(entity="gpu2")["usage"] == 2
    with pytest.raises(ExoscaleAPIAuthException, match="Quota exceeded for resource instance"):
        new_instance(c)
    c.wait(c.delete_instance(id=op["reference"]["id"])["id"])
    with pytest.raises(ExoscaleAPIAuthException, match="not authorized"):
        new_instance(c, family="gpua30", size="small")


def test_no_capacity(cloud):
    c = client(cloud)
    control(cloud, "faults", {"no_capacity": 1})
    op = new_instance(c, family="gpu3", size="small")
    done = finished(c, op)
    assert done["state"] == "failure" and done["reason"] == "unavailable"
    assert done["message"] == "Insufficient capacity for instance type gpu3.small in zone ch-gva-2"
    with pytest.raises(ExoscaleAPIServerException, match="Operation error: failure, unavailable"):
        c.wait(op["id"])
    assert control(cloud, "state")["empty"]
    assert finished(c, new_instance(c))["state"] == "success"  # disarmed after one


def test_rate_limit_internal_error_lost_answer(cloud):
    c = client(cloud)
    control(cloud, "faults", {"rate_limit": 2})
    for _ in range(2):
        with pytest.raises(ExoscaleAPIClientException, match="429") as e:
            c.list_instances()
        assert e.value.response.headers["Retry-After"] == "1"
    assert c.list_instances() == {"instances": []}
    control(cloud, "faults", {"internal_error": 1})
    with pytest.raises(ExoscaleAPIServerException, match="500"):
        c.list_ssh_keys()
    control(cloud, "faults", {"lost_answer": 1})
    with pytest.raises(ExoscaleAPIServerException, match="504"):
        new_instance(c, name="lost")
    assert [i["name"] for i in c.list_instances()["instances"]] == ["lost"]  # carried out all the same
    faults = control(cloud, "faults")
    assert faults["faults"] == {} and set(faults["known"]) >= {"quota", "no_capacity", "slow_start"}


def test_slow_start(cloud):
    c = client(cloud)
    control(cloud, "faults", {"slow_start": {"seconds": 1.0, "count": 1}})
    t0 = time.monotonic()
    op = new_instance(c)
    time.sleep(0.5)
    assert c.get_instance(id=op["reference"]["id"])["state"] == "starting"
    assert c.get_operation(id=op["id"])["state"] == "pending"
    assert finished(c, op)["state"] == "success" and time.monotonic() - t0 >= 1.0
    assert control(cloud, "faults")["faults"] == {}


def test_serve_prints_one_json_line():
    p = subprocess.Popen([sys.executable, "-m", "harness.lab.emulators.exoscale", "serve", "--zone", "de-fra-1"],
                         stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        info = json.loads(p.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:") and info["url"].endswith("/v2")
        assert info["zone"] == "de-fra-1" and info["pid"] == p.pid and info["lab"] is None
        assert requests.get(info["auth_url"], timeout=5).json()["empty"]
        c = v2.Client(info["credentials"]["key"], info["credentials"]["secret"], url=info["url"])
        assert c.list_zones()["zones"][0]["name"] == "de-fra-1" and c.list_instances() == {"instances": []}
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0


# -- with a lab -------------------------------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@pytest.fixture(scope="module")
def exolab():
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    name = next(n for n in ("exe", "exf", "exg") if f" {lab._names(n, 1)['subnet']}." not in used)
    lab.down(name)
    yield lab.up(hosts=1, name=name, slots=1) and json.loads((lab.state_dir(name) / "state.json").read_text())
    lab.down(name)


def keyscan(address):
    p = subprocess.run(["ssh-keyscan", "-T", "3", "-t", "ed25519", address], capture_output=True, text=True,
                       timeout=15)
    return " ".join(p.stdout.split()[1:3]) if p.stdout.strip() else None


@needs_root
def test_lab_instance_serves_the_user_data_host_key(exolab, tmp_path, monkeypatch):
    monkeypatch.setattr(v2, "_sleep", lambda start: time.sleep(0.05))
    host = exolab["hosts"][0]
    hdir = lab.state_dir(exolab["name"]) / host["name"]
    lab_key = " ".join((hdir / "hostkey.pub").read_text().split()[:2])
    for f in ("key", "hk"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / f)], check=True)
    hk_pub = (tmp_path / "hk.pub").read_text().strip()
    cloud_config = "#cloud-config\n" + json.dumps({"ssh_keys": {"ed25519_private": (tmp_path / "hk").read_text(),
                                                                "ed25519_public": hk_pub}})
    with ExoscaleEmulator(lab_state=exolab, build_seconds=0.2) as emu:
        c = client(emu)
        c.register_ssh_key(name="labkey", public_key=(tmp_path / "key.pub").read_text())
        op = new_instance(c, ssh_key={"name": "labkey"}, user_data=base64.b64encode(cloud_config.encode()).decode())
        c.wait(op["id"])
        inst = c.get_instance(id=op["reference"]["id"])
        assert inst["public-ip"] == host["address"]
        assert until("the new host key", lambda: keyscan(host["address"]) == " ".join(hk_pub.split()[:2]))
        kh = tmp_path / "known_hosts"
        kh.write_text(f"{host['address']} {hk_pub}\n")
        p = subprocess.run(["ssh", "-i", str(tmp_path / "key"), "-o", "StrictHostKeyChecking=yes", "-o",
                            f"UserKnownHostsFile={kh}", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                            f"root@{host['address']}", "hostname"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and p.stdout.strip() == host["name"], p.stderr
        assert control(emu, "state")["hosts"] == {host["name"]: inst["id"]}
        # the only host is taken: the next instance finds no capacity
        assert finished(c, new_instance(c, name="more"))["reason"] == "unavailable"
        c.wait(c.delete_instance(id=inst["id"])["id"])
        assert until("the lab's host key", lambda: keyscan(host["address"]) == lab_key)
        assert not (hdir / "hostkey.lab").exists()
        assert (tmp_path / "key.pub").read_text().split()[1] not in (hdir / "authorized_keys").read_text()
        assert os.path.exists(f"/proc/{host['sshd_pid']}")  # SIGHUP re-executes sshd in place
        # a host key still installed when the emulator stops is restored too
        op = new_instance(c, user_data=base64.b64encode(cloud_config.encode()).decode())
        c.wait(op["id"])
        assert until("the new host key", lambda: keyscan(host["address"]) == " ".join(hk_pub.split()[:2]))
    assert until("the lab's host key", lambda: keyscan(host["address"]) == lab_key)
    p = subprocess.run(lab.ssh_command(exolab, host, "hostname"), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == host["name"], p.stderr
