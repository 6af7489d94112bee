"""What Exoscale accepts for each setting of the GPU server: its zones and instance types, and
one check per setting that returns the normalised value or raises SettingsError (one line: the
setting, its value, what is accepted).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.provision.base import PRIMARY, server_index

PROJECT = "ollama-exoscale"  # the Pulumi project, the name prefix and the label value
# Marks every cloud object as ours, so that orphans can be found by label.
MANAGED_BY_LABEL = ("managed-by", PROJECT)
# The GPU image, its drivers, Docker and a model or two: Exoscale's own minimum (10) is too small.
MIN_DISK_GB = 50

# Exoscale's zones and compute instance types, as its API client has them (egoscale
# v3/schemas.go: `ZoneName`, `InstanceTypeFamily`, `InstanceTypeSize`; the provider's zone list,
# terraform-provider-exoscale pkg/config/config.go `Zones`, is the same).
ZONES = ("at-vie-1", "at-vie-2", "bg-sof-1", "ch-dk-2", "ch-gva-2", "de-fra-1", "de-muc-1",
         "hr-zag-1")
INSTANCE_FAMILIES = ("gpu", "gpu2", "gpu3", "gpua30", "gpu3080ti", "gpua5000", "gpub300",
                     "gpurtx6000pro", "standard", "cpu", "memory", "storage", "colossus")
INSTANCE_SIZES = ("micro", "tiny", "small", "medium", "large", "extra-large", "huge", "mega",
                  "titan", "titan48c", "jumbo", "colossus")
# Where Exoscale offers block storage volumes (its block storage documentation).
BLOCK_STORAGE_ZONES = ("at-vie-1", "ch-gva-2", "de-fra-1")
# `name`, `name:tag`, `namespace/name:tag`, `hf.co/user/repo:Q4_K_M`: no spaces, no shell syntax.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_MODEL = re.compile(rf"^{_PART}(/{_PART})*(:[A-Za-z0-9._-]+)?$")
# The name prefix ends up in hostnames and in names of Exoscale objects.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._/:@-]{0,255}$")
_SSH_PUBLIC_KEY = re.compile(r"^(ssh-|ecdsa-|sk-)")

INSTANCE_STATES = ("running", "stopped", "absent")
# Where `getTemplate` looks for the template by name (the provider's `visibility` argument):
# Exoscale's own templates, or the organisation's (a template `ollama-exoscale bake` made).
TEMPLATE_VISIBILITIES = ("public", "private")
MIN_VOLUME_GB = 10  # Exoscale's smallest block storage volume
# What a server of the `servers` setting may be declared as (`absent`: every server, only).
SERVER_STATES = ("running", "stopped")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message says which, what it is and what works."""

    def __init__(self, setting: str, value: Any, accepted: str):
        self.setting = setting
        self.value = value
        self.accepted = accepted
        super().__init__(f"{setting}={_show(value)} is not valid: {accepted}")

    def named(self, names: Mapping[str, str]) -> SettingsError:
        """The same error, with the setting spelled as a source (env, stack config) spells it."""
        return SettingsError(names.get(self.setting, self.setting), self.value, self.accepted)


def check_zone(zone: str) -> str:
    if zone not in ZONES:
        raise SettingsError("zone", zone, f"expected one of Exoscale's zones: {', '.join(ZONES)}")
    return zone


def check_instance_type(instance_type: str) -> str:
    text = instance_type if isinstance(instance_type, str) else ""
    family, dot, size = text.partition(".")
    if not dot or family not in INSTANCE_FAMILIES or size not in INSTANCE_SIZES:
        raise SettingsError(
            "instance_type", instance_type,
            f"expected family.size, like gpua5000.small (`exo compute instance-type list`), "
            f"with a family of {', '.join(INSTANCE_FAMILIES)} and a size of "
            f"{', '.join(INSTANCE_SIZES)}",
        )
    return instance_type


def check_template(template: str) -> str:
    if not isinstance(template, str) or not template.strip() or not template.isprintable():
        raise SettingsError(
            "template", template,
            "expected a template name on one line, like 'Linux Ubuntu 24.04 LTS 64-bit'",
        )
    return template.strip()


def check_template_visibility(visibility: str) -> str:
    if visibility not in TEMPLATE_VISIBILITIES:
        raise SettingsError(
            "template_visibility", visibility,
            "expected public (Exoscale's templates) or private (your organisation's, like one "
            "`ollama-exoscale bake` made)",
        )
    return visibility


def check_volume(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or (size and size < MIN_VOLUME_GB):
        raise SettingsError(
            "model_volume_gb", size,
            f"expected 0 (no volume) or a whole number of GB >= {MIN_VOLUME_GB} for the models",
        )
    return size


def check_disk_size(disk_size: int) -> int:
    if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < MIN_DISK_GB:
        raise SettingsError(
            "disk_size", disk_size,
            f"expected a whole number of GB >= {MIN_DISK_GB} (the GPU image, its drivers, "
            "Docker and the models)",
        )
    return disk_size


def check_models(models: Iterable[str]) -> tuple[str, ...]:
    models = _as_tuple(models)
    if not models:
        raise SettingsError(
            "models", ",".join(models), "expected at least one model name, like llama3.2"
        )
    for model in models:
        if not isinstance(model, str) or not _MODEL.match(model) or len(model) > 200:
            raise SettingsError(
                "models", model, "expected model names like llama3.2, qwen3:8b or user/model:tag"
            )
    return models


def check_allowed_cidrs(cidrs: Iterable[str]) -> tuple[str, ...]:
    cidrs = _as_tuple(cidrs)
    if not cidrs:
        raise SettingsError(
            "allowed_cidrs", "",
            "set it to the proxy host's public address, like 203.0.113.7/32, or explicitly to "
            "0.0.0.0/0 to rely on the token alone",
        )
    return _networks("allowed_cidrs", cidrs)


def check_ssh_key(ssh_key: str | None) -> str | None:
    if ssh_key is None or (isinstance(ssh_key, str) and not ssh_key.strip()):
        return None
    if not isinstance(ssh_key, str) or _SSH_PUBLIC_KEY.match(ssh_key) or "\n" in ssh_key:
        raise SettingsError(
            "ssh_key", ssh_key,
            "expected the name of an SSH key registered in Exoscale "
            "(`exo compute ssh-key register NAME FILE`), not the key itself",
        )
    return ssh_key.strip()


def check_ssh_cidrs(cidrs: Iterable[str], ssh_key: str | None) -> tuple[str, ...]:
    cidrs = _as_tuple(cidrs)
    if cidrs and not (ssh_key and str(ssh_key).strip()):
        raise SettingsError(
            "ssh_cidrs", ",".join(cidrs),
            "SSH is opened only with a key: set the SSH key name too, or leave this empty",
        )
    return _networks("ssh_cidrs", cidrs)


def check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    checked = {}
    for key, value in dict(labels or {}).items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise SettingsError(
                "labels", key, "expected label keys of letters, digits and . _ / - (<= 63)"
            )
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise SettingsError(
                "labels", f"{key}={value}",
                "expected label values of letters, digits and . _ / : @ - (<= 255)",
            )
        checked[key] = value
    checked[MANAGED_BY_LABEL[0]] = MANAGED_BY_LABEL[1]  # always: how orphans are found
    return checked


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535 or port == 22:
        raise SettingsError(
            "port", port, "expected a TCP port between 1 and 65535, other than 22 (SSH)"
        )
    return port


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SettingsError(
            "name", name,
            "expected lowercase letters, digits and hyphens (<= 40), like ollama-exoscale",
        )
    return name


def check_servers(servers: Mapping[str, str] | Iterable[str] | None, default_state: str
                  ) -> dict[str, str] | None:
    """The GPU servers to declare, name -> state; names as proxy/provision/base.py makes them
    (gpu, gpu-1, ...). A list takes `default_state` for each; None: today's one server."""
    if servers is None:
        return None
    given = dict(servers) if isinstance(servers, Mapping) else None
    names = list(given) if given is not None else list(_as_tuple(servers))
    shown = ",".join(str(n) for n in names)
    if not names:
        raise SettingsError(
            "servers", shown,
            f"expected at least one server name, like {PRIMARY}; to remove every server run "
            "`pulumi destroy`, or set instanceState to absent to keep the model volume",
        )
    checked: dict[str, str] = {}
    for name in names:
        try:
            server_index(name if isinstance(name, str) else "")
        except ValueError:
            raise SettingsError(
                "servers", name,
                f"expected server names {PRIMARY}, {PRIMARY}-1, {PRIMARY}-2, ... (no leading "
                "zeros): the names the proxy gives its servers",
            ) from None
        if name in checked:
            raise SettingsError("servers", shown, f"{name} is named twice: name each server once")
        state = given[name] if given is not None else default_state
        if state not in SERVER_STATES:
            raise SettingsError(
                "servers", f"{name}={state}",
                f"expected a state of {' or '.join(SERVER_STATES)} for each server",
            )
        checked[name] = state
    return dict(sorted(checked.items(), key=lambda item: server_index(item[0])))


def _networks(setting: str, cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """Each CIDR parsed and written canonically (a bare address becomes /32 or /128)."""
    networks = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError:
            raise SettingsError(
                setting, cidr, "expected IP networks like 203.0.113.7/32 or 2001:db8::/64"
            ) from None
        if str(network) not in networks:
            networks.append(str(network))
    return tuple(networks)


def _as_tuple(values: Iterable[str] | str) -> tuple[str, ...]:
    """A tuple of the non-blank items (a string is taken as a comma-separated list)."""
    if isinstance(values, str):
        values = values.split(",")
    stripped = (v.strip() if isinstance(v, str) else v for v in values)
    return tuple(v for v in stripped if v != "")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
