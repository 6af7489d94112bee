"""The proxy's configuration: read once from the environment (flags override), validated, frozen.

A bad value stops start-up with one line that names the variable, the value and what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.lifecycle.schedule import ScheduleError, Window, parse_windows

PROVISIONERS = ("exoscale", "local")
IDLE_ACTIONS = ("destroy", "stop")
MAX_NUMBER = 1e12  # the largest number any setting accepts


class ConfigError(ValueError):
    """One line for a person: the variable, the bad value, what is accepted."""


@dataclass(frozen=True)
class Config:
    provisioner: str = "exoscale"
    local_command: str = "ollama serve"
    local_addr: str = "127.0.0.1:11435"
    idle_timeout: float = 1800.0
    idle_action: str = "destroy"
    bind: str = "127.0.0.1:11434"
    workers: int = 2
    max_connections: int = 1000  # open client connections per worker; beyond: 503
    threads: int = 32  # per worker, for its blocking calls (store reads, the wrong-key lock)
    state_dir: Path = Path(".ollama-exoscale")
    state_url: str = ""  # empty: SQLite in the state dir
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # may also pull, push, create, copy, delete, upload, warm up
    key_names: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    max_hold: float = 0.0
    max_held: int = 16  # per worker: held requests beyond it get 503 at once
    max_body: int = 100 * 2**20  # bytes of a request body, but for blob uploads
    max_blob: int = 0  # bytes of a blob upload; 0: no limit (models are many GB)
    auth_failures: int = 10  # failed keys per client address a minute, then 429
    models: tuple[str, ...] = ("llama3.2",)
    zone: str = "at-vie-2"
    instance_type: str = "gpua5000.small"
    template: str = "Linux Ubuntu 24.04 LTS 64-bit"
    disk_size: int = 100
    connect_timeout: float = 10.0
    read_timeout: float = 900.0  # Ollama may take minutes to load a model before its first byte
    client_timeout: float = 15.0  # for a client's request head, and each piece of its body
    worker_timeout: float = 60.0  # gunicorn's heartbeat timeout (the event loop's, not a stream's)
    start_timeout: float = 3600.0  # most seconds in `starting` before it is an error
    lease_ttl: float = 15.0
    tick: float = 0.25  # how often a worker syncs with the store
    retry_base: float = 15.0  # first back-off after a failed provisioning; doubles each time
    retry_max: float = 900.0
    log_level: str = "info"
    log_format: str = "text"
    hourly_price: float = 0.0  # of the GPU server, for the cost estimate; 0: no estimate
    currency: str = "EUR"
    max_instance_hours: float = 0.0  # a server older than this is drained and removed; 0: never
    daily_gpu_hours: float = 0.0  # GPU hours a day, then demand gets 503; 0: no budget
    drain_timeout: float = 300.0  # most seconds to let streams finish before a forced removal
    max_servers: int = 1  # most GPU servers at once (1: one server, as before fleets)
    min_servers: int = 0  # servers kept even when idle
    target_inflight: int = 4  # requests in flight per ready server above which another starts
    scale_up_after: float = 5.0  # seconds the fleet must stay above target before a start
    warm_windows: tuple[Window, ...] = ()
    timezone: str = "UTC"  # of the warm windows and of "a day" for the budget
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.bind, "PROXY_BIND")

    @property
    def local_url(self) -> str:
        host, port = split_host_port(self.local_addr, "PROXY_LOCAL_ADDR")
        return f"http://{host}:{port}"

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.timezone)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values never to log: keys, credentials, passphrases."""
        names = ("EXOSCALE_API_KEY", "EXOSCALE_API_SECRET", "PULUMI_CONFIG_PASSPHRASE",
                 "AWS_SECRET_ACCESS_KEY", "PULUMI_ACCESS_TOKEN")
        return self.api_keys + self.admin_keys + tuple(self.env.get(n, "") for n in names)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: object) -> Config:
        """Build the config from `env` (default: os.environ); non-None `flags` win over env."""
        env = dict(os.environ if env is None else env)
        read = _Reader(env, {k: v for k, v in flags.items() if v is not None})
        idle_default = read.number("EXOSCALE_IDLE_TIMEOUT", 1800.0, minimum=1)
        keys, admin_keys, names = read.keys("PROXY_API_KEYS", "PROXY_ADMIN_KEYS", "PROXY_KEYS_FILE")
        config = cls(
            provisioner=read.choice("PROXY_PROVISIONER", "exoscale", PROVISIONERS),
            local_command=read.text("PROXY_LOCAL_COMMAND", "ollama serve"),
            local_addr=read.address("PROXY_LOCAL_ADDR", "127.0.0.1:11435"),
            idle_timeout=read.number("PROXY_IDLE_TIMEOUT", idle_default, minimum=1),
            idle_action=read.choice("PROXY_IDLE_ACTION", "destroy", IDLE_ACTIONS),
            bind=read.address("PROXY_BIND", "127.0.0.1:11434"),
            workers=int(read.number("PROXY_WORKERS", 2, minimum=1, whole=True)),
            max_connections=int(read.number("PROXY_MAX_CONNECTIONS", 1000, minimum=1,
                                            whole=True)),
            threads=int(read.number("PROXY_THREADS", 32, minimum=1, whole=True)),
            state_dir=Path(read.text("PROXY_STATE_DIR", ".ollama-exoscale")).absolute(),
            state_url=read.state_url("PROXY_STATE_URL"),
            api_keys=keys,
            admin_keys=admin_keys,
            key_names=names,
            max_hold=read.number("PROXY_MAX_HOLD", 0.0, minimum=0),
            max_held=int(read.number("PROXY_MAX_HELD", 16, minimum=0, whole=True)),
            max_body=int(read.number("PROXY_MAX_BODY_MB", 100, minimum=0) * 2**20),
            max_blob=int(read.number("PROXY_MAX_BLOB_GB", 0, minimum=0) * 2**30),
            auth_failures=int(read.number("PROXY_AUTH_FAILURES", 10, minimum=1, whole=True)),
            # Read and checked by the program's own rules (infra/settings.py): one owner each.
            models=read.setting("models"),
            zone=read.setting("zone"),
            instance_type=read.setting("instance_type"),
            template=read.setting("template"),
            disk_size=read.setting("disk_size"),
            connect_timeout=read.number("PROXY_CONNECT_TIMEOUT", 10.0, minimum=0.1),
            read_timeout=read.number("PROXY_READ_TIMEOUT", 900.0, minimum=1),
            client_timeout=read.number("PROXY_CLIENT_TIMEOUT", 15.0, minimum=0.1),
            worker_timeout=read.number("PROXY_WORKER_TIMEOUT", 60.0, minimum=1),
            start_timeout=read.number("PROXY_START_TIMEOUT", 3600.0, minimum=1),
            lease_ttl=read.number("PROXY_LEASE_TTL", 15.0, minimum=1),
            tick=read.number("PROXY_TICK", 0.25, minimum=0.01),
            retry_base=read.number("PROXY_RETRY_BASE", 15.0, minimum=0.1),
            retry_max=read.number("PROXY_RETRY_MAX", 900.0, minimum=0.1),
            log_level=read.choice(
                "PROXY_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            log_format=read.choice("PROXY_LOG_FORMAT", "text", ("text", "json")),
            hourly_price=read.number("PROXY_HOURLY_PRICE", 0.0, minimum=0),
            currency=read.text("PROXY_CURRENCY", "EUR"),
            max_instance_hours=read.number("PROXY_MAX_INSTANCE_HOURS", 0.0, minimum=0),
            daily_gpu_hours=read.number("PROXY_DAILY_GPU_HOURS", 0.0, minimum=0),
            drain_timeout=read.number("PROXY_DRAIN_TIMEOUT", 300.0, minimum=0),
            max_servers=int(read.number("PROXY_MAX_SERVERS", 1, minimum=1, whole=True)),
            min_servers=int(read.number("PROXY_MIN_SERVERS", 0, minimum=0, whole=True)),
            target_inflight=int(read.number("PROXY_TARGET_INFLIGHT", 4, minimum=1, whole=True)),
            scale_up_after=read.number("PROXY_SCALE_UP_AFTER", 5.0, minimum=0),
            warm_windows=read.windows("PROXY_WARM_WINDOWS"),
            timezone=read.timezone("PROXY_TIMEZONE"),
            env=env,
        )
        if config.min_servers > config.max_servers:
            raise ConfigError(
                f"PROXY_MIN_SERVERS={config.min_servers} is more than PROXY_MAX_SERVERS="
                f"{config.max_servers}; keep at most as many servers as may run"
            )
        return config


def _host_zone() -> str:
    """The zone /etc/localtime links to (…/zoneinfo/Europe/Vienna), else UTC."""
    target = os.path.realpath("/etc/localtime")
    _, sep, name = target.partition("/zoneinfo/")
    return name if sep and name else "UTC"


def split_host_port(value: str, name: str) -> tuple[str, int]:
    """'host:port' → (host, port); raises ConfigError naming `name`."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{name}={value!r} is not an address; use host:port, e.g. 127.0.0.1:11434"
        )
    return host, int(port)


class _Reader:
    """Reads one variable at a time, flags first, raising ConfigError with the variable's name."""

    def __init__(self, env: Mapping[str, str], flags: Mapping[str, object]):
        self.env = env
        self.flags = flags

    def raw(self, name: str) -> str | None:
        if name in self.flags:
            return str(self.flags[name])
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() != "" else None

    def text(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def choice(self, name: str, default: str, accepted: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in accepted:
            raise ConfigError(
                f"{name}={value!r} is not accepted; use one of: {', '.join(accepted)}"
            )
        return value

    def number(
        self, name: str, default: float, *, minimum: float, whole: bool = False
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        kind = "a whole number" if whole else "a number"
        try:
            number = int(value) if whole else float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not {kind}; use e.g. {default:g}") from None
        if number != number or number < minimum or number == float("inf"):
            raise ConfigError(f"{name}={value!r} is out of range; use {kind} >= {minimum:g}")
        if number > MAX_NUMBER:  # no setting needs more; MB * 2**20 and the like stay finite
            raise ConfigError(f"{name}={value!r} is out of range; use {kind} <= {MAX_NUMBER:g}")
        return number

    def address(self, name: str, default: str) -> str:
        value = self.text(name, default)
        split_host_port(value, name)
        return value

    def items(self, name: str) -> tuple[str, ...]:
        value = self.raw(name) or ""
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def keys(
        self, plain: str, admin: str, file: str
    ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
        """(user keys, admin keys, key → name for the logs) from two lists and a keys file.

        The file has one key a line: `NAME KEY [admin]`; `#` starts a comment.
        """
        keys = list(self.items(plain))
        admins = list(self.items(admin))
        names = {k: f"{plain}[{i}]" for i, k in enumerate(keys)}
        names.update({k: f"{admin}[{i}]" for i, k in enumerate(admins)})
        path = self.raw(file)
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"{file}={path!r} cannot be read ({exc.strerror})") from None
            for number, line in enumerate(lines, 1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                if len(words) not in (2, 3) or (len(words) == 3 and words[2] != "admin"):
                    raise ConfigError(
                        f"{file}={path!r} line {number} is not `NAME KEY [admin]`"
                    )
                (admins if len(words) == 3 else keys).append(words[1])
                names[words[1]] = words[0]
        for key in keys + admins:
            if len(key) < 8:
                raise ConfigError(
                    f"an API key named {names[key]} is shorter than 8 characters; use a long "
                    "random key, e.g. `openssl rand -hex 24`"
                )
        return tuple(keys), tuple(admins), names

    def setting(self, setting: str) -> object:
        """A variable the Pulumi program reads too, checked by its rules (`env_setting`)."""
        from infra.settings import ENV_NAMES, SettingsError, env_setting

        name = ENV_NAMES[setting]
        value = self.raw(name)
        try:
            return env_setting({} if value is None else {name: value}, setting)
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None

    def windows(self, name: str) -> tuple[Window, ...]:
        value = self.raw(name) or ""
        try:
            return parse_windows(value)
        except ScheduleError as exc:
            raise ConfigError(f"{name}={value!r}: {exc}") from None

    def timezone(self, name: str) -> str:
        """An IANA zone name; by default TZ, else the host's /etc/localtime, else UTC."""
        value = self.raw(name) or self.env.get("TZ", "").lstrip(":") or _host_zone()
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{name}={value!r} is not a time zone; use an IANA name, e.g. Europe/Vienna or UTC"
            ) from None
        return value

    def state_url(self, name: str) -> str:
        value = self.raw(name) or ""
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme not in ("sqlite", "s3") or not (parts.netloc or parts.path):
            raise ConfigError(
                f"{name}={value!r} is not a store URL; use sqlite:///path/state.db or "
                "s3://bucket/prefix?endpoint=https://sos-at-vie-2.exo.io"
            )
        return value
