"""OpenStack configuration the way OpenStack users already have it, plus cloudbench's per-cloud settings.

Where the cloud comes from (first match wins):

1. ``--cloud NAME`` (provider option ``cloud``) or ``OS_CLOUD``: the entry NAME of ``clouds.yaml``, searched
   as openstacksdk does: ``$OS_CLIENT_CONFIG_FILE``, ``./clouds.yaml``, ``~/.config/openstack/clouds.yaml``,
   ``/etc/openstack/clouds.yaml``.
2. The ``OS_*`` variables of an openrc file (``OS_AUTH_URL``, ``OS_USERNAME``/``OS_PASSWORD`` or
   ``OS_APPLICATION_CREDENTIAL_ID``/``OS_APPLICATION_CREDENTIAL_SECRET``, ``OS_PROJECT_NAME``, ...).

Both password and application-credential auth are understood. cloudbench's own settings for a cloud
(profile, network, image, flavors, ...) live in a ``cloudbench:`` mapping inside the clouds.yaml entry
(openstacksdk ignores keys it does not know), and any of them can be given as a provider option
(``--option network=private``), which wins. A *profile* (``generic``, ``cern``, ``otc``, ``lab``) supplies the
defaults of a kind of cloud.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from providers.errors import PlanError

# Settings cloudbench reads from the clouds.yaml entry's ``cloudbench:`` mapping or from provider options.
SETTINGS = {
    "profile": "generic | cern | otc | lab",
    "network": "the network the servers join (name or id)",
    "image": "image name or id (with TensorFlow 2.15.1 + Horovod 0.28.1, or a shared checkout)",
    "flavors": "flavors the plan may use, in order of preference (comma-separated)",
    "availability_zones": "zones the plan may use, in order (comma-separated)",
    "floating_ip_pool": "external network for floating IPs; empty: private addresses only",
    "user": "login user of the image",
    "python": "interpreter on the servers",
    "workdir": "per-run scratch on the servers",
    "device": "gpu | cpu | auto: which flavors to consider",
    "ssh_cidr": "where SSH may come from (default: this machine's address towards the servers)",
    "build_timeout": "seconds a server may stay in BUILD",
    "ssh_timeout": "seconds to wait for SSH on an ACTIVE server",
    "api_deadline": "seconds to keep retrying 429/5xx answers of one API call",
    "replacements": "servers in ERROR or stuck in BUILD replaced per run before giving up",
    "host_keys": "console (host keys from the console log, cloud-init's block) | tofu (ssh-keyscan)",
    "gpu_flavors": "mapping flavor -> {model, count} for flavors whose extra specs do not say",
    "prices": "mapping flavor -> price per hour (OpenStack has no price API)",
    "currency": "currency of prices",
    "provisioner": "sdk (libcloud, default) | terraform (terraform/openstack)",
}

# Published GPU flavors of T-Systems Open Telekom Cloud (ECS p2/p2v: NVIDIA V100), as a fallback for flavors
# whose extra specs do not name their GPUs. Check them with `cloudbench run --provider openstack --dry-run`.
OTC_GPU_FLAVORS = {
    "p2.2xlarge.8": {"model": "V100", "count": 1}, "p2.4xlarge.8": {"model": "V100", "count": 2},
    "p2.8xlarge.8": {"model": "V100", "count": 4}, "p2v.2xlarge.8": {"model": "V100", "count": 1},
    "p2v.4xlarge.8": {"model": "V100", "count": 2}, "p2v.8xlarge.8": {"model": "V100", "count": 4},
    "p2v.16xlarge.8": {"model": "V100", "count": 8},
}

PROFILES = {
    "generic": {"about": "any OpenStack cloud: the defaults below, everything from clouds.yaml"},
    "cern": {"about": "CERN-style on-prem cloud: private network, no floating IPs, root login with the key pair",
             "floating_ip_pool": "", "user": "root", "device": "gpu"},
    "otc": {"about": "T-Systems Open Telekom Cloud: IAM endpoint per region (eu-de, eu-nl), floating IPs from "
                     "admin_external_net, V100 flavors", "auth_url": "https://iam.{region}.otc.t-systems.com/v3",
            "region": "eu-de", "regions": ("eu-de", "eu-nl"), "floating_ip_pool": "admin_external_net",
            "gpu_flavors": OTC_GPU_FLAVORS, "currency": "EUR", "device": "gpu"},
    "lab": {"about": "the lab's OpenStack emulator (cloudbench lab up --emulate openstack): lab hosts as servers",
            "network": "lab-net", "image": "cloudbench-lab", "user": "root", "device": "cpu",
            "floating_ip_pool": ""},
}

DEFAULTS = {"floating_ip_pool": "", "device": "auto", "build_timeout": 900, "ssh_timeout": 300,
            "api_deadline": 120, "replacements": 2, "host_keys": "console", "workdir": "/var/tmp/cloudbench"}


@dataclass(frozen=True)
class Cloud:
    name: str  # clouds.yaml entry, or "env" for OS_* variables
    source: str  # the file or "environment"
    auth_url: str
    region: Optional[str]
    auth_type: str  # "password" or "application_credential"
    username: Optional[str] = None
    password: Optional[str] = None
    project_name: Optional[str] = None
    project_id: Optional[str] = None
    user_domain: str = "Default"
    project_domain: str = "Default"
    project_domain_id: str = "default"  # libcloud scopes the token by the project's domain *id*
    app_cred_id: Optional[str] = None
    app_cred_secret: Optional[str] = None
    cacert: Optional[str] = None  # CA bundle for the cloud's TLS certificates
    verify: bool = True
    settings: dict = field(default_factory=dict)

    def get(self, key, default=None):
        v = self.settings.get(key)
        return default if v is None else v


def clouds_yaml_paths():
    """openstacksdk's search order: $OS_CLIENT_CONFIG_FILE, ./clouds.yaml, ~/.config/openstack, /etc/openstack.
    A lab's emulator is found the same way (``eval "$(cloudbench lab env)"`` sets OS_CLIENT_CONFIG_FILE)."""
    env = os.environ.get("OS_CLIENT_CONFIG_FILE")
    paths = [Path(env)] if env else []
    return paths + [Path("clouds.yaml"), Path.home() / ".config/openstack/clouds.yaml",
                    Path("/etc/openstack/clouds.yaml")]


def _read_clouds(name):
    import yaml

    searched = []
    for p in clouds_yaml_paths():
        searched.append(str(p))
        if not p.is_file():
            continue
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PlanError("clouds.yaml", str(p), f"valid YAML ({e})") from None
        clouds = doc.get("clouds") or {}
        if name in clouds:
            return p, clouds[name]
    raise PlanError("cloud", name, "an entry of clouds.yaml (searched " + ", ".join(searched) + ")")


def load(cloud=None, options=None) -> Cloud:
    """The cloud to use and its cloudbench settings (options override clouds.yaml, which overrides the profile)."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    name = cloud or os.environ.get("OS_CLOUD")
    if name:
        path, entry = _read_clouds(name)
        auth = dict(entry.get("auth") or {})
        own = dict(entry.get("cloudbench") or {})
        src = str(path)
        auth_type = entry.get("auth_type") or ("application_credential" if auth.get("application_credential_id")
                                              else "password")
        region = entry.get("region_name")
        tls = {"cacert": entry.get("cacert"), "verify": entry.get("verify", True) is not False}
    else:
        env = os.environ
        if not env.get("OS_AUTH_URL") and "profile" not in options:
            raise PlanError("cloud", None, "--cloud NAME (an entry of clouds.yaml), OS_CLOUD, or the OS_* variables "
                                           "of an openrc file (OS_AUTH_URL, OS_USERNAME, ...)")
        name, src, own = "env", "environment", {}
        auth = {"auth_url": env.get("OS_AUTH_URL"), "username": env.get("OS_USERNAME"),
                "password": env.get("OS_PASSWORD"), "project_name": env.get("OS_PROJECT_NAME"),
                "project_id": env.get("OS_PROJECT_ID"),
                "user_domain_name": env.get("OS_USER_DOMAIN_NAME"),
                "project_domain_name": env.get("OS_PROJECT_DOMAIN_NAME"),
                "project_domain_id": env.get("OS_PROJECT_DOMAIN_ID"),
                "application_credential_id": env.get("OS_APPLICATION_CREDENTIAL_ID"),
                "application_credential_secret": env.get("OS_APPLICATION_CREDENTIAL_SECRET")}
        auth_type = env.get("OS_AUTH_TYPE") or ("application_credential" if auth["application_credential_id"]
                                                else "password")
        region = env.get("OS_REGION_NAME")
        tls = {"cacert": env.get("OS_CACERT"), "verify": env.get("OS_INSECURE", "").lower() not in ("1", "true")}
    settings = dict(own)
    settings.update(options)
    profile = str(settings.get("profile") or "generic")
    if profile not in PROFILES:
        raise PlanError("profile", profile, "one of " + ", ".join(PROFILES))
    merged = {**DEFAULTS, **{k: v for k, v in PROFILES[profile].items() if k != "about"}, **settings,
              "profile": profile}
    region = options.get("region") or region or merged.get("region")
    auth_url = auth.get("auth_url") or merged.get("auth_url")
    if auth_url and "{region}" in auth_url:
        auth_url = auth_url.format(region=region)
    auth_type = auth_type.replace("v3", "").replace("applicationcredential", "application_credential")
    if auth_type not in ("password", "application_credential"):
        raise PlanError(f"auth_type of cloud {name} ({src})", auth_type, "password or v3applicationcredential")
    c = Cloud(name=name, source=src, auth_url=auth_url, region=region, auth_type=auth_type,
              username=auth.get("username"), password=auth.get("password"),
              project_name=auth.get("project_name"), project_id=auth.get("project_id"),
              user_domain=auth.get("user_domain_name") or auth.get("domain_name") or "Default",
              project_domain=auth.get("project_domain_name") or auth.get("domain_name") or "Default",
              project_domain_id=auth.get("project_domain_id") or auth.get("domain_id") or "default",
              app_cred_id=auth.get("application_credential_id"),
              app_cred_secret=auth.get("application_credential_secret"), settings=merged, **tls)
    missing = [k for k, v in (("auth_url", c.auth_url),) if not v]
    if c.auth_type == "password":
        missing += [k for k, v in (("username", c.username), ("password", c.password)) if not v]
        if not c.project_name:
            missing.append("project_name")
        if c.project_domain.lower() != "default" and not (auth.get("project_domain_id") or auth.get("domain_id")):
            raise PlanError(f"auth of cloud {name} ({src})", f"project_domain_name {c.project_domain}",
                            "project_domain_id as well (the token is scoped by the domain's id)")
    else:
        missing += [k for k, v in (("application_credential_id", c.app_cred_id),
                                   ("application_credential_secret", c.app_cred_secret)) if not v]
    if missing:
        raise PlanError(f"auth of cloud {name} ({src})", ", ".join(missing) + " missing",
                        "auth_url plus username/password/project_name, or application_credential_id/secret")
    for k in ("build_timeout", "ssh_timeout", "api_deadline", "replacements"):
        try:
            merged[k] = float(merged[k]) if k != "replacements" else int(merged[k])
        except (TypeError, ValueError):
            raise PlanError(k, merged[k], "a number") from None
    if merged["device"] not in ("gpu", "cpu", "auto"):
        raise PlanError("device", merged["device"], "gpu, cpu or auto")
    if merged["host_keys"] not in ("console", "tofu"):
        raise PlanError("host_keys", merged["host_keys"], "console or tofu")
    return c


def as_list(value):
    """A comma-separated option or a YAML list -> list of strings."""
    if value in (None, ""):
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


_ALIAS = re.compile(r"^\s*([^:,]+):(\d+)\s*$")


def flavor_gpus(name, extra_specs, mapping=None):
    """(GPU model or None, GPU count) of a flavor, from its extra specs or the per-cloud mapping.

    Understands ``pci_passthrough:alias`` (``a100:8``, several aliases comma-separated), Huawei/OTC's
    ``pci_passthrough:gpu_specs`` (same form), placement's ``resources:PGPU`` / ``resources:VGPU`` (count; model
    from a ``trait:CUSTOM_*`` required trait if any) and the mapping ``{flavor: {model, count}}``.
    """
    specs = extra_specs or {}
    for key in ("pci_passthrough:alias", "pci_passthrough:gpu_specs"):
        if specs.get(key):
            models, count = [], 0
            for part in str(specs[key]).split(","):
                m = _ALIAS.match(part)
                if m:
                    models.append(m.group(1))
                    count += int(m.group(2))
            if count:
                return "/".join(dict.fromkeys(models)), count
    for key, kind in (("resources:PGPU", "PGPU"), ("resources:VGPU", "vGPU")):
        if str(specs.get(key, "")).isdigit() and int(specs[key]) > 0:
            traits = [k.split("CUSTOM_", 1)[1] for k, v in specs.items()
                      if k.startswith("trait:CUSTOM_") and v == "required"]
            return (traits[0] if traits else kind), int(specs[key])
    m = (mapping or {}).get(name)
    if m:
        return m.get("model"), int(m.get("count", 0))
    return None, 0
