"""The typed settings of the GPU server: what the Pulumi program needs, checked before any cloud.

`Settings` is built from the proxy's environment (`Settings.from_env`) or from the stack's
configuration when an operator runs `pulumi up` by hand (`Settings.from_pulumi_config`). A bad
value raises `SettingsError`, whose message is one line naming the setting as the source spells
it (`EXOSCALE_ZONE` or `ollama-exoscale:zone`), the value, and what is accepted.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from infra.checks import (
    BLOCK_STORAGE_ZONES,
    INSTANCE_STATES,
    PRIMARY,
    PROJECT,
    SettingsError,
    check_allowed_cidrs,
    check_disk_size,
    check_instance_type,
    check_labels,
    check_models,
    check_name,
    check_port,
    check_servers,
    check_ssh_cidrs,
    check_ssh_key,
    check_template,
    check_template_visibility,
    check_volume,
    check_zone,
)

# How each source spells each setting, for error messages.
ENV_NAMES = {
    "zone": "EXOSCALE_ZONE",
    "instance_type": "EXOSCALE_INSTANCE_TYPE",
    "template": "EXOSCALE_TEMPLATE",
    "template_visibility": "EXOSCALE_TEMPLATE_VISIBILITY",
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
    "template_visibility": "templateVisibility",
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
    "servers": "servers",
}
# `absent`: the instance is not declared (the kept model volume and the firewall stay).
@dataclass(frozen=True)
class Settings:
    """What the GPU server looks like; every field is checked when the object is made."""

    zone: str = "at-vie-2"
    instance_type: str = "gpua5000.small"
    template: str = "Linux Ubuntu 24.04 LTS 64-bit"
    template_visibility: str = "public"  # `private`: a template of the organisation (bake)
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
    # The GPU servers, name -> running | stopped (None: today's one server, `gpu`); the proxy
    # sets it per update, never from the environment.
    servers: dict[str, str] | None = field(default=None, hash=False)
    # Servers this update keeps as they were made: new settings (other models, a new release's
    # setup, another type) neither replace nor resize them (infra/program.py KEPT_AS_MADE), so
    # an update about one server never cuts another's streams. The proxy sets it per update,
    # never from the environment.
    kept: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        normalise = object.__setattr__  # frozen: normalise once, here
        normalise(self, "zone", check_zone(self.zone))
        normalise(self, "instance_type", check_instance_type(self.instance_type))
        normalise(self, "template", check_template(self.template))
        normalise(self, "template_visibility", check_template_visibility(self.template_visibility))
        normalise(self, "disk_size", check_disk_size(self.disk_size))
        normalise(self, "models", check_models(self.models))
        normalise(self, "allowed_cidrs", check_allowed_cidrs(self.allowed_cidrs))
        normalise(self, "ssh_key", check_ssh_key(self.ssh_key))
        normalise(self, "ssh_cidrs", check_ssh_cidrs(self.ssh_cidrs, self.ssh_key))
        normalise(self, "labels", check_labels(self.labels))
        normalise(self, "port", check_port(self.port))
        normalise(self, "name", check_name(self.name))
        normalise(self, "model_volume_gb", check_volume(self.model_volume_gb))
        if self.model_volume_gb and self.zone not in BLOCK_STORAGE_ZONES:
            raise SettingsError(
                "model_volume_gb", self.model_volume_gb,
                f"Exoscale has block storage only in {', '.join(BLOCK_STORAGE_ZONES)}, not in "
                f"{self.zone}: choose one of those zones, or no model volume (0)",
            )
        if self.instance_state not in INSTANCE_STATES:
            raise SettingsError("instance_state", self.instance_state,
                                f"expected one of {', '.join(INSTANCE_STATES)}")
        listed = "running" if self.instance_state == "absent" else self.instance_state
        normalise(self, "servers", check_servers(self.servers, listed))
        normalise(self, "kept", frozenset(self.kept))

    @property
    def server_names(self) -> tuple[str, ...]:
        """The servers the stack is about, instance or not (their volumes are kept if absent)."""
        return tuple(self.servers) if self.servers is not None else (PRIMARY,)

    @property
    def declared_servers(self) -> dict[str, str]:
        """Each server whose instance is declared, with its state (none when `absent`)."""
        if self.instance_state == "absent":
            return {}
        return dict(self.servers) if self.servers is not None else {PRIMARY: self.instance_state}

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


def _servers(setting: str, raw: str) -> dict[str, str] | tuple[str, ...]:
    """Names (a JSON list, or comma-separated), or a JSON object of name -> state."""
    if raw.startswith("{"):
        accepted = 'expected a JSON object of server name -> state, like {"gpu": "running"}'
        states = _json(setting, raw, dict, accepted)
        return {str(k).strip(): str(v).strip() for k, v in states.items()}
    return _list(setting, raw)


def _json(setting: str, raw: str, kind: type, accepted: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        raise SettingsError(setting, raw, accepted) from None
    if not isinstance(value, kind):
        raise SettingsError(setting, raw, accepted)
    return value


# How each setting is read from text, and the check `Settings` applies to it (shared above).
_READERS: dict[str, Callable[[str, str], Any]] = {
    "zone": _text, "instance_type": _text, "template": _text, "template_visibility": _text,
    "ssh_key": _text,
    "name": _text, "disk_size": _whole_number, "port": _whole_number,
    "model_volume_gb": _whole_number,
    "models": _list, "allowed_cidrs": _list, "ssh_cidrs": _list, "labels": _labels,
    "instance_state": _text, "servers": _servers,
}
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "zone": check_zone, "instance_type": check_instance_type, "template": check_template,
    "disk_size": check_disk_size, "models": check_models,
}
