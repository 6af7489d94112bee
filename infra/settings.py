"""The typed settings of the GPU server: what the Pulumi program needs, checked before any cloud.

`Settings` is built from the proxy's environment (`Settings.from_env`) or from the stack's
configuration when an operator runs `pulumi up` by hand (`Settings.from_pulumi_config`). A bad
value raises `SettingsError`, whose message is one line naming the setting as the source spells
it (`EXOSCALE_ZONE` or `ollama-exoscale:zone`), the value, and what is accepted.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

PROJECT = "ollama-exoscale"
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

# How each source spells each setting, for error messages.
ENV_NAMES = {
    "zone": "EXOSCALE_ZONE",
    "instance_type": "EXOSCALE_INSTANCE_TYPE",
    "template": "EXOSCALE_TEMPLATE",
    "disk_size": "EXOSCALE_DISK_SIZE",
    "models": "OLLAMA_MODEL",
    "allowed_cidrs": "EXOSCALE_ALLOWED_CIDRS",
    "ssh_key": "EXOSCALE_SSH_KEY",
    "ssh_cidrs": "EXOSCALE_SSH_CIDRS",
    "labels": "EXOSCALE_LABELS",
    "port": "EXOSCALE_PORT",
    "name": "EXOSCALE_NAME",
    "model_volume_gb": "PROXY_MODEL_VOLUME_GB",
}
CONFIG_KEYS = {
    "zone": "zone",
    "instance_type": "instanceType",
    "template": "template",
    "disk_size": "diskSize",
    "models": "models",
    "allowed_cidrs": "allowedCidrs",
    "ssh_key": "sshKey",
    "ssh_cidrs": "sshCidrs",
    "labels": "labels",
    "port": "port",
    "name": "name",
    "instance_state": "instanceState",
    "model_volume_gb": "modelVolumeGb",
}
# `absent`: the instance is not declared (the kept model volume and the firewall stay).
INSTANCE_STATES = ("running", "stopped", "absent")
MIN_VOLUME_GB = 10  # Exoscale's smallest block storage volume


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


@dataclass(frozen=True)
class Settings:
    """What the GPU server looks like; every field is checked when the object is made."""

    zone: str = "at-vie-2"
    instance_type: str = "gpua5000.small"
    template: str = "Linux Ubuntu 24.04 LTS 64-bit"
    disk_size: int = 100
    models: tuple[str, ...] = ("llama3.2",)
    # Who may reach the public port; no default that opens the world.
    allowed_cidrs: tuple[str, ...] = ()
    ssh_key: str | None = None  # the name of an SSH key registered in the Exoscale organisation
    ssh_cidrs: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    port: int = 11434
    name: str = PROJECT  # prefix of the names of the cloud objects
    # `stopped` keeps the instance and its disk (models included) without a running GPU; the
    # proxy sets it per update (PROXY_IDLE_ACTION=stop), never from the environment.
    instance_state: str = "running"
    # A block storage volume for the models, kept when the instance goes (0: none).
    model_volume_gb: int = 0

    def __post_init__(self) -> None:
        normalise = object.__setattr__  # frozen: normalise once, here
        normalise(self, "zone", _check_zone(self.zone))
        normalise(self, "instance_type", _check_instance_type(self.instance_type))
        normalise(self, "template", _check_template(self.template))
        normalise(self, "disk_size", _check_disk_size(self.disk_size))
        normalise(self, "models", _check_models(self.models))
        normalise(self, "allowed_cidrs", _check_allowed_cidrs(self.allowed_cidrs))
        normalise(self, "ssh_key", _check_ssh_key(self.ssh_key))
        normalise(self, "ssh_cidrs", _check_ssh_cidrs(self.ssh_cidrs, self.ssh_key))
        normalise(self, "labels", _check_labels(self.labels))
        normalise(self, "port", _check_port(self.port))
        normalise(self, "name", _check_name(self.name))
        normalise(self, "model_volume_gb", _check_volume(self.model_volume_gb))
        if self.model_volume_gb and self.zone not in BLOCK_STORAGE_ZONES:
            raise SettingsError(
                "model_volume_gb", self.model_volume_gb,
                f"Exoscale has block storage only in {', '.join(BLOCK_STORAGE_ZONES)}, not in "
                f"{self.zone}: choose one of those zones, or no model volume (0)",
            )
        if self.instance_state not in INSTANCE_STATES:
            raise SettingsError("instance_state", self.instance_state,
                                f"expected one of {', '.join(INSTANCE_STATES)}")

    @property
    def ssh_enabled(self) -> bool:
        """SSH is opened only when there is both a key to log in with and somewhere to come from."""
        return bool(self.ssh_key and self.ssh_cidrs)

    @property
    def ipv6(self) -> bool:
        """The instance needs an IPv6 address when a client may come from an IPv6 network."""
        cidrs = self.allowed_cidrs + (self.ssh_cidrs if self.ssh_enabled else ())
        return any(ipaddress.ip_network(c).version == 6 for c in cidrs)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from the proxy's environment; blank variables count as unset."""

        def get(setting: str) -> str | None:
            if setting not in ENV_NAMES:
                return None  # the proxy's own decision, e.g. the instance state
            value = env.get(ENV_NAMES[setting])
            return value.strip() if value is not None and value.strip() else None

        try:
            return cls(**_parse(get))
        except SettingsError as exc:
            raise exc.named(ENV_NAMES) from None

    @classmethod
    def from_pulumi_config(cls) -> Settings:
        """Settings from the stack's `ollama-exoscale:*` configuration (`pulumi up` by hand)."""
        import pulumi  # here: reading the environment must not need the Pulumi SDK

        config = pulumi.Config(PROJECT)
        names = {k: f"{PROJECT}:{v}" for k, v in CONFIG_KEYS.items()}

        def get(setting: str) -> str | None:
            value = config.get(CONFIG_KEYS[setting])
            return value.strip() if value is not None and value.strip() else None

        try:
            return cls(**_parse(get))
        except SettingsError as exc:
            raise exc.named(names) from None


def env_setting(env: Mapping[str, str], setting: str) -> Any:
    """One setting from its environment variable (`ENV_NAMES`), read and checked exactly as
    `Settings.from_env` does, or its default when unset: the proxy's `Config` reads
    OLLAMA_MODEL and the EXOSCALE_* variables it shares with the program through this."""
    raw = env.get(ENV_NAMES[setting])
    raw = raw.strip() if raw is not None and raw.strip() else None
    if raw is None:
        return next(f.default for f in fields(Settings) if f.name == setting)
    try:
        return _CHECKS[setting](_READERS[setting](setting, raw))
    except SettingsError as exc:
        raise exc.named(ENV_NAMES) from None


def _parse(get: Callable[[str], str | None]) -> dict[str, Any]:
    """The keyword arguments of `Settings` for the values a source sets (as text)."""
    values = {}
    for setting, read in _READERS.items():
        raw = get(setting)
        if raw is not None:
            values[setting] = read(setting, raw)
    if "allowed_cidrs" not in values:
        values["allowed_cidrs"] = ()  # say what to set, rather than a missing argument
    return values


def _text(setting: str, raw: str) -> str:
    return raw


def _whole_number(setting: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(setting, raw, "expected a whole number") from None


def _list(setting: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list; a JSON list (`pulumi config set --path key[0] …`) also works."""
    if raw.startswith("["):
        items = _json(setting, raw, list, "expected a comma-separated list or a JSON list")
        return tuple(str(item).strip() for item in items if str(item).strip())
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _labels(setting: str, raw: str) -> dict[str, str]:
    """`k=v,k=v`; a JSON object (`pulumi config set --path labels.k v`) also works."""
    if raw.startswith("{"):
        pairs = _json(setting, raw, dict, "expected k=v pairs or a JSON object")
        return {str(k).strip(): str(v).strip() for k, v in pairs.items()}
    labels = {}
    for pair in _list(setting, raw):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(setting, raw, "expected key=value pairs separated by commas")
        labels[key.strip()] = value.strip()
    return labels


# -- checks: each returns the normalised value or raises SettingsError -------------------------


def _json(setting: str, raw: str, kind: type, accepted: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        raise SettingsError(setting, raw, accepted) from None
    if not isinstance(value, kind):
        raise SettingsError(setting, raw, accepted)
    return value


def _check_zone(zone: str) -> str:
    if zone not in ZONES:
        raise SettingsError("zone", zone, f"expected one of Exoscale's zones: {', '.join(ZONES)}")
    return zone


def _check_instance_type(instance_type: str) -> str:
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


def _check_template(template: str) -> str:
    if not isinstance(template, str) or not template.strip() or not template.isprintable():
        raise SettingsError(
            "template", template,
            "expected a template name on one line, like 'Linux Ubuntu 24.04 LTS 64-bit'",
        )
    return template.strip()


def _check_volume(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or (size and size < MIN_VOLUME_GB):
        raise SettingsError(
            "model_volume_gb", size,
            f"expected 0 (no volume) or a whole number of GB >= {MIN_VOLUME_GB} for the models",
        )
    return size


def _check_disk_size(disk_size: int) -> int:
    if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < MIN_DISK_GB:
        raise SettingsError(
            "disk_size", disk_size,
            f"expected a whole number of GB >= {MIN_DISK_GB} (the GPU image, its drivers, "
            "Docker and the models)",
        )
    return disk_size


def _check_models(models: Iterable[str]) -> tuple[str, ...]:
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


def _check_allowed_cidrs(cidrs: Iterable[str]) -> tuple[str, ...]:
    cidrs = _as_tuple(cidrs)
    if not cidrs:
        raise SettingsError(
            "allowed_cidrs", "",
            "set it to the proxy host's public address, like 203.0.113.7/32, or explicitly to "
            "0.0.0.0/0 to rely on the token alone",
        )
    return _networks("allowed_cidrs", cidrs)


def _check_ssh_key(ssh_key: str | None) -> str | None:
    if ssh_key is None or (isinstance(ssh_key, str) and not ssh_key.strip()):
        return None
    if not isinstance(ssh_key, str) or _SSH_PUBLIC_KEY.match(ssh_key) or "\n" in ssh_key:
        raise SettingsError(
            "ssh_key", ssh_key,
            "expected the name of an SSH key registered in Exoscale "
            "(`exo compute ssh-key register NAME FILE`), not the key itself",
        )
    return ssh_key.strip()


def _check_ssh_cidrs(cidrs: Iterable[str], ssh_key: str | None) -> tuple[str, ...]:
    cidrs = _as_tuple(cidrs)
    if cidrs and not (ssh_key and str(ssh_key).strip()):
        raise SettingsError(
            "ssh_cidrs", ",".join(cidrs),
            "SSH is opened only with a key: set the SSH key name too, or leave this empty",
        )
    return _networks("ssh_cidrs", cidrs)


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
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


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535 or port == 22:
        raise SettingsError(
            "port", port, "expected a TCP port between 1 and 65535, other than 22 (SSH)"
        )
    return port


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SettingsError(
            "name", name,
            "expected lowercase letters, digits and hyphens (<= 40), like ollama-exoscale",
        )
    return name


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


# How each setting is read from text, and the check `Settings` applies to it (shared above).
_READERS: dict[str, Callable[[str, str], Any]] = {
    "zone": _text, "instance_type": _text, "template": _text, "ssh_key": _text,
    "name": _text, "disk_size": _whole_number, "port": _whole_number,
    "model_volume_gb": _whole_number,
    "models": _list, "allowed_cidrs": _list, "ssh_cidrs": _list, "labels": _labels,
    "instance_state": _text,
}
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "zone": _check_zone, "instance_type": _check_instance_type, "template": _check_template,
    "disk_size": _check_disk_size, "models": _check_models,
}
