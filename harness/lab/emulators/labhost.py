"""What every cloud emulator does to a lab host that backs one of its instances (shared by the OpenStack,
AWS and Exoscale emulators), and the loopback HTTP plumbing they share.

An instance on a lab host: the instance's SSH public key is appended to the host's authorized_keys, marked
``cloudbench-emulator:<instance id>``; deleting the instance removes that line and kills every process in the
host's network namespace except its sshd listener, as deleting a VM would.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KEY_MARK = "cloudbench-emulator:"  # comment of the authorized_keys lines the emulators add


def lab_hosts(lab_state):
    """The lab's hosts, each with ``dir`` (its state directory: authorized_keys, hostkey.pub), or None."""
    if not lab_state:
        return None
    d = Path(lab_state["dir"])
    return [{**h, "dir": str(d / h["name"])} for h in lab_state["hosts"]]


def load_lab(name):
    """The state of running lab ``name``; SystemExit naming the missing file when it is not up."""
    from harness.lab.common import state_dir

    path = state_dir(name) / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"lab {name!r} is not up ({path} missing)") from None


def key_blob(public_key):
    """(type, base64 blob) of an OpenSSH public key line, or None when it is not one."""
    parts = (public_key or "").strip().split()
    if len(parts) < 2 or not re.fullmatch(r"(ssh-|ecdsa-|sk-)[\w@.-]+", parts[0]):
        return None
    try:
        base64.b64decode(parts[1], validate=True)
    except ValueError:
        return None
    return parts[0], parts[1]


def fake_host_key():
    """A well-formed ed25519 public key for instances without a lab host behind them."""
    def field(b):
        return len(b).to_bytes(4, "big") + b
    return "ssh-ed25519 " + base64.b64encode(field(b"ssh-ed25519") + field(secrets.token_bytes(32))).decode()


def host_key(host):
    """The lab host's SSH host key line."""
    return (Path(host["dir"]) / "hostkey.pub").read_text().strip()


def console_lines(name, address, key, has_key, created, launched=None):
    """A VM's console log as cloud-init prints it: boot lines, then (once ``launched``) the network, the
    authorized keys and the SSH host key block that providers read host keys from."""
    blob = key.split()[1]
    fp = base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")
    lines = ["[    0.000000] Linux version 6.1.0-cloud-amd64 (cloudbench-lab) #1 SMP",
             "[    0.000000] Command line: BOOT_IMAGE=/vmlinuz root=LABEL=cloudimg-rootfs ro console=ttyS0",
             "[    1.234567] EXT4-fs (vda1): mounted filesystem with ordered data mode.",
             f"Cloud-init v. 23.1.2 running 'init-local' at {created}. Up 3.01 seconds."]
    if launched:
        lines += [f"Cloud-init v. 23.1.2 running 'init' at {launched}. Up 4.52 seconds.",
                  "ci-info: ++++++++++++++++++++++++++++Net device info+++++++++++++++++++++++++++++",
                  f"ci-info: | eth0 | True | {address} | 255.255.255.0 | global | fa:16:3e:00:00:00 |",
                  "Generating public/private ed25519 key pair.",
                  f"Cloud-init v. 23.1.2 running 'modules:config' at {launched}. Up 6.10 seconds.",
                  "ci-info: ++++++++Authorized keys from /root/.ssh/authorized_keys for user root+++++++++" if has_key
                  else "ci-info: no authorized SSH keys fingerprints found for user root.",
                  "-----BEGIN SSH HOST KEY FINGERPRINTS-----",
                  f"256 SHA256:{fp} root@{name} (ED25519)",
                  "-----END SSH HOST KEY FINGERPRINTS-----",
                  "-----BEGIN SSH HOST KEY KEYS-----",
                  key,
                  "-----END SSH HOST KEY KEYS-----",
                  f"Cloud-init v. 23.1.2 finished at {launched}. Datasource DataSourceOpenStackLocal "
                  "[net,ver=2].  Up 7.95 seconds"]
    return lines


def floating_ip_commands(host, hosts, address, on):
    """The ``ip`` commands that make a floating IP reach ``host`` (or stop): the address on the host's interface
    (its sshd listens on every address of its namespace), routed there from this machine and from every other
    lab host (a cloud's hairpin; Horovod probes every address a host has)."""
    addr = address + "/32"
    peers = [["-n", h["netns"]] for h in hosts if h["netns"] != host["netns"]]
    if on:
        return [["ip", "-n", host["netns"], "addr", "add", addr, "dev", "eth0"],
                *(["ip", *ns, "route", "replace", addr, "via", host["address"]] for ns in [[], *peers])]
    return [*(["ip", *ns, "route", "del", addr] for ns in [[], *peers]),
            ["ip", "-n", host["netns"], "addr", "del", addr, "dev", "eth0"]]


def update_json_locked(path, change):
    """Read-modify-write of a small JSON file under an exclusive lock (several processes share it);
    ``change(mapping)`` edits it in place and returns what the caller gets back."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        data = json.loads(f.read() or "{}")
        out = change(data)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data))
        return out


def write_atomic(path, text):
    """Replace a file in one step (sshd may read authorized_keys at any moment)."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def authorize(host, public_key, instance_id):
    """The instance's key may log in to its lab host, as cloud-init would have arranged."""
    kind, blob = key_blob(public_key)
    path = Path(host["dir"]) / "authorized_keys"
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    write_atomic(path, text + f"{kind} {blob} {KEY_MARK}{instance_id}\n")


def unauthorize(host, instance_id=None):
    """Remove the key lines of one instance (of every emulator instance when None); the lab's own stay."""
    path = Path(host["dir"]) / "authorized_keys"
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    mark = KEY_MARK + (instance_id or "")
    kept = [ln for ln in lines if not (ln.rstrip().endswith(mark) if instance_id else mark in ln)]
    if kept != lines:
        write_atomic(path, "".join(kept))


def kill_sessions(host):
    """Kill every process in the host's network namespace except its sshd listener (what a VM deletion
    does to the VM's processes). A few passes: sessions may fork while we kill."""
    for _ in range(5):
        p = subprocess.run(["ip", "netns", "pids", host["netns"]], capture_output=True, text=True)
        pids = [int(x) for x in p.stdout.split() if x.isdigit() and int(x) != host.get("sshd_pid")]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def release(host, instance_id):
    """The instance is gone: its key no longer opens the host and nothing it started still runs."""
    unauthorize(host, instance_id)
    kill_sessions(host)


class Holds:
    """Answers held back on purpose, so that a test's signal lands inside an API call for certain.
    ``POST /_emulator/hold {"method": "POST", "path": REGEX, "seconds": S, "count": N}`` arms one (the next N
    matching requests wait S seconds before they are handled); ``GET /_emulator/hold`` tells what is armed
    and how many requests are being held now; ``POST /_emulator/hold {}`` disarms all."""

    def __init__(self):
        self.lock, self.armed, self.holding, self.held = threading.Lock(), [], 0, 0

    def control(self, method, body):
        with self.lock:
            if method == "POST":
                if not body:
                    self.armed = []
                else:
                    try:
                        rule = {"method": str(body.get("method") or "").upper(), "path": re.compile(body["path"]),
                                "body": re.compile(body.get("body") or ""), "seconds": float(body["seconds"]),
                                "count": int(body.get("count", 1))}
                    except (KeyError, TypeError, ValueError, re.error) as e:
                        return 400, {"error": f"hold takes method, path (a regex), seconds and count ({e})"}
                    self.armed.append(rule)
            return 200, {"armed": [{**r, "path": r["path"].pattern, "body": r["body"].pattern} for r in self.armed],
                         "holding": self.holding,
                         "held": self.held}

    def seconds(self, method, target, raw=b""):
        """Seconds to hold this request (0: none); counts it as holding until ``done()``. ``body`` rules match
        the request body too (AWS's query API names its action there)."""
        with self.lock:
            for r in self.armed:
                if (not r["method"] or r["method"] == method) and r["path"].search(target) and \
                        r["body"].search(raw.decode("utf-8", "replace")):
                    r["count"] -= 1
                    if r["count"] <= 0:
                        self.armed.remove(r)
                    self.holding += 1
                    self.held += 1
                    return r["seconds"]
        return 0

    def done(self):
        with self.lock:
            self.holding -= 1

    def hold(self, method, target, raw=b""):
        s = self.seconds(method, target, raw)
        if s:
            try:
                time.sleep(s)
            finally:
                self.done()


def hold_control(server, method, target, raw):
    """The /_emulator/hold control of a labhost HTTP server, or None for any other request (after holding it
    back when a hold matches)."""
    holds = server.__dict__.setdefault("holds", Holds())
    if target.split("?")[0].rstrip("/") == "/_emulator/hold":
        try:
            body = json.loads(raw or b"{}") if method == "POST" else None
        except ValueError:
            return 400, {"error": "hold takes a JSON object"}
        return holds.control(method, body)
    holds.hold(method, target, raw)
    return None


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive. ``server.emulator.handle(method, target, headers, raw)`` answers
    (status, body, headers): body None, a dict/list (JSON), bytes (sent as is: set Content-Type in headers)
    or text."""

    protocol_version = "HTTP/1.1"
    server_version = "cloudbench-emulator/1.0"

    def _serve(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n > 0 else b""
        emu = self.server.emulator
        held = hold_control(self.server, self.command, self.path, raw)
        status, body, headers = held + ({},) if held else emu.handle(self.command, self.path, self.headers, raw)
        headers = dict(headers or {})
        if body is None:
            data, ctype = b"", None
        elif isinstance(body, (dict, list)):
            data, ctype = json.dumps(body).encode(), "application/json"
        elif isinstance(body, bytes):
            data, ctype = body, None
        else:
            data, ctype = str(body).encode(), "text/plain; charset=UTF-8"
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        if status not in (204, 304):
            if ctype and not any(k.lower() == "content-type" for k in headers):
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    def log_message(self, fmt, *args):
        if getattr(self.server.emulator, "verbose", False):
            sys.stderr.write("%s\n" % (fmt % args))


def http_server(emulator, host, port):
    """A threading HTTP server (not yet serving) that hands every request to ``emulator.handle``."""
    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    httpd.emulator = emulator
    return httpd


def serve_until_signal(info, stop):
    """Print ``info`` as the one JSON line that says the emulator listens, wait for SIGTERM/SIGINT, then
    call ``stop()``."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(json.dumps(info), flush=True)
    done.wait()
    stop()
