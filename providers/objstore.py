"""S3-compatible object storage (AWS S3, Exoscale SOS, CERN S3, moto) for training data and results.

``--data s3://bucket/prefix``: the HDF5 objects under the prefix are shared out among the fleet's nodes
(node i gets every n-th file; with fewer files than nodes every node gets all of them) and each node
downloads its own files over presigned HTTPS URLs, so nodes need neither credentials nor boto3. The
trainer then shards a node's files among that node's ranks (``--data-shard local``; ``global`` when every
node holds every file).

``--upload s3://bucket/prefix``: when the run ends, its results directory goes to
``s3://bucket/prefix/<run_id>/`` without what must not leave this machine (private keys, Terraform state)
or is not a result (staged data); an earlier ``_UPLOADED`` marker is removed first and written again last
(with the run's state), so a reader can tell a complete upload from one cut short.

Endpoint and credentials are boto3's (AWS_PROFILE, AWS_ACCESS_KEY_ID..., AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, the profile's endpoint_url); ``--s3-endpoint URL`` overrides the endpoint, e.g.
https://sos-ch-gva-2.exo.io for Exoscale SOS or https://s3.cern.ch at CERN.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from providers.errors import CloudbenchError, PlanError

log = logging.getLogger("cloudbench")
# Presigned download URLs: SigV4's longest (7 days), so a node replaced late in a sweep can still download
# (credentials from STS/SSO cut it to their own lifetime).
URL_SECONDS = 7 * 24 * 3600
SUFFIXES = (".h5", ".hdf5")

# Runs on each node with its own interpreter: argv[1] is the directory, stdin a JSON list of [name, url].
# Each file arrives as name.part and is renamed once complete (size checked against Content-Length).
FETCH = r"""
import json, os, shutil, sys, urllib.request
dest = sys.argv[1]
os.makedirs(dest, exist_ok=True)
total = 0
for name, url in json.load(sys.stdin):
    path = os.path.join(dest, name)
    if os.path.exists(path):
        continue
    with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
        want = r.headers.get("Content-Length")
    got = os.path.getsize(path + ".part")
    if want is not None and int(want) != got:
        sys.exit(f"{name}: got {got} of {want} bytes")
    os.replace(path + ".part", path)
    total += got
print(json.dumps({"files": len(os.listdir(dest)), "bytes": total}))
"""


def parse(url, field="data"):
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", url or "")
    if not m:
        raise PlanError(field, url, "s3://BUCKET[/PREFIX] (a bucket name of 3-63 lower-case letters, digits, . or -)")
    return m.group(1), (m.group(2) or "").strip("/")


def client(endpoint=None):
    import boto3

    return boto3.client("s3", **({"endpoint_url": endpoint} if endpoint else {}))


def _error(e, what):
    import botocore.exceptions as bex

    if isinstance(e, bex.ClientError):
        err = e.response.get("Error", {})
        return CloudbenchError(f"{what}: {err.get('Code')}: {err.get('Message')}")
    if isinstance(e, bex.NoCredentialsError):
        return CloudbenchError(f"{what}: no S3 credentials (AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return CloudbenchError(f"{what}: {e}")


def objects(url, endpoint=None):
    """The HDF5 object keys under url (checked before anything is provisioned)."""
    import botocore.exceptions as bex

    bucket, prefix = parse(url)
    keys = []
    try:
        s3 = client(endpoint)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix and prefix + "/"):
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(SUFFIXES)]
    except (bex.BotoCoreError, bex.ClientError, ValueError) as e:
        raise _error(e, f"listing {url}") from None
    if not keys:
        raise PlanError("data", url, f"a prefix holding HDF5 objects ({', '.join(SUFFIXES)}); it holds none")
    names = [k.rsplit("/", 1)[-1] for k in keys]
    if len(set(names)) != len(names):
        raise PlanError("data", url, "HDF5 objects with distinct file names (nested prefixes repeat one)")
    return keys


def shards(url, nodes, endpoint=None):
    """([[(file name, presigned URL), ...] per node], "local" | "global") for the HDF5 objects under url."""
    import botocore.exceptions as bex

    bucket, _ = parse(url)
    keys = objects(url, endpoint)
    try:
        s3 = client(endpoint)
        signed = [(k.rsplit("/", 1)[-1], s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=URL_SECONDS)) for k in sorted(keys)]
    except (bex.BotoCoreError, bex.ClientError, ValueError) as e:
        raise _error(e, f"signing {url}") from None
    if len(signed) >= nodes:
        return [signed[i::nodes] for i in range(nodes)], "local"
    return [signed] * nodes, "global"


def fetch_command(python, dest):
    return [python, "-c", FETCH, dest]


def fetch_here(items, dest):
    """Download [(name, url)] into dest on this machine (the local provider's staging)."""
    p = subprocess.run(fetch_command(sys.executable, str(dest)), input=json.dumps(items), capture_output=True,
                       text=True, timeout=3600)
    if p.returncode != 0:
        raise CloudbenchError(f"staging data into {dest} failed: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def kept_here(rel):
    """Files of a run directory that are never uploaded: staged data, private keys, Terraform state."""
    name = rel.name
    return (rel.parts[0] == "data" or (name.startswith(("id_", "hostkey")) and not name.endswith(".pub"))
            or ".tfstate" in name or name.startswith("terraform.tfvars"))


def upload(directory, url, run_id, endpoint=None, state=None):
    """Put the run's files under url/<run_id>/ (not what kept_here() keeps), then the _UPLOADED marker (an
    earlier one goes first); returns (destination, files, bytes)."""
    import botocore.exceptions as bex

    bucket, prefix = parse(url, "upload")
    base = "/".join(p for p in (prefix, run_id) if p)
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and not kept_here(p.relative_to(directory)))
    size = 0
    try:
        s3 = client(endpoint)
        s3.delete_object(Bucket=bucket, Key=f"{base}/_UPLOADED")
        for f in files:
            s3.upload_file(str(f), bucket, f"{base}/{f.relative_to(directory).as_posix()}")
            size += f.stat().st_size
        s3.put_object(Bucket=bucket, Key=f"{base}/_UPLOADED", Body=json.dumps(
            {"run_id": run_id, "state": state, "files": len(files), "bytes": size}).encode())
    except (bex.BotoCoreError, bex.ClientError, OSError, ValueError) as e:
        raise _error(e, f"uploading {directory} to s3://{bucket}/{base}/") from None
    return f"s3://{bucket}/{base}/", len(files), size

