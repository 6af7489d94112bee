"""Baking a private template from the GPU server, through Exoscale's API v2.

`TemplateBaker` drives the official `exoscale` package's generated client
(`exoscale.api.v2.Client`, built from the OpenAPI document the package ships,
`exoscale/openapi.json`): stop the instance (`stop-instance`), snapshot its disk
(`create-snapshot`), wait for each operation (`Client.wait`, polling `get-operation`), and
promote the snapshot to a template (`promote-snapshot-to-template`) named
`ollama-exoscale-<date>`, with the default user of the template the instance was made from;
`start-instance` brings it back. The client's errors carry the API's answer: they are turned
into ProvisionError with every known secret scrubbed. The lifecycle runs this on its
operation thread (proxy/lifecycle/operations.py `_bake`); Pulumi's stack is not touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from proxy.provision.base import Progress, ProvisionError
from proxy.util import secrets

T = TypeVar("T")
TEMPLATE_PREFIX = "ollama-exoscale"
OPERATION_TIMEOUT = 3600  # seconds: a snapshot of a 100 GB disk takes minutes, not hours
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,254}$")


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    zone: str
    default_user: str
    size: int | None = None  # bytes, as the API reports it


def template_name(now: datetime | None = None) -> str:
    """`ollama-exoscale-<date>`, to the minute (two bakes a day keep apart)."""
    now = now or datetime.now(timezone.utc)
    return f"{TEMPLATE_PREFIX}-{now.strftime('%Y%m%d-%H%M')}"


def check_template_name(name: str) -> str:
    if not isinstance(name, str) or not _TEMPLATE_NAME.match(name):
        raise ProvisionError(
            f"template name {name!r} is not valid: expected 1 to 255 letters, digits, spaces "
            "and . _ - (the API's limit), like ollama-exoscale-20260101-1200")
    return name


class TemplateBaker:
    def __init__(self, client: Any, zone: str, *, operation_timeout: float = OPERATION_TIMEOUT):
        self.client = client
        self.zone = zone
        self.operation_timeout = operation_timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str], zone: str) -> TemplateBaker:
        """The client for the proxy's credentials; EXOSCALE_API_URL points it elsewhere (the
        API's URL is https://api-<zone>.exoscale.com/v2 by default, from the document)."""
        from exoscale.api.v2 import Client

        key, secret = env.get("EXOSCALE_API_KEY"), env.get("EXOSCALE_API_SECRET")
        if not key or not secret:
            raise ProvisionError("baking a template needs Exoscale API credentials: set "
                                 "EXOSCALE_API_KEY and EXOSCALE_API_SECRET")
        secrets.known.learn(key, secret)
        url = (env.get("EXOSCALE_API_URL") or "").strip() or None
        client = Client(key, secret, url=url) if url else Client(key, secret, zone=zone)
        return cls(client, zone)

    def bake(self, instance_id: str, name: str, progress: Progress,
             description: str = "") -> Template:
        """Stop the instance, snapshot it, promote the snapshot; the instance stays stopped."""
        check_template_name(name)
        instance = self._call("reading the instance", lambda: self.client.get_instance(
            id=instance_id))
        default_user = self.default_user(instance)
        if instance.get("state") != "stopped":
            self.stop(instance_id, progress)
        progress("taking a snapshot of the instance's disk")
        done = self._wait("snapshotting the instance",
                          lambda: self.client.create_snapshot(id=instance_id))
        snapshot_id = done["reference"]["id"]
        progress(f"promoting snapshot {snapshot_id} to the private template {name}")
        body: dict[str, Any] = {"name": name, "description": description or
                                "ollama-exoscale: NVIDIA driver, Docker, the toolkit, Ollama"}
        if default_user:
            body["default_user"] = default_user
        done = self._wait("promoting the snapshot",
                          lambda: self.client.promote_snapshot_to_template(id=snapshot_id, **body))
        found = self._call("reading the template", lambda: self.client.get_template(
            id=done["reference"]["id"]))
        return Template(found["id"], found.get("name", name), self.zone,
                        found.get("default-user", default_user), found.get("size"))

    def default_user(self, instance: dict) -> str:
        """The default user of the template the instance was made from (`ubuntu` on Ubuntu)."""
        template = instance.get("template") or {}
        if template.get("default-user"):
            return template["default-user"]
        if not template.get("id"):
            return ""
        try:
            return self.client.get_template(id=template["id"]).get("default-user") or ""
        except Exception:  # a public template another zone lists: no user is still a template
            return ""

    def stop(self, instance_id: str, progress: Progress) -> None:
        progress("stopping the GPU server for a consistent snapshot")
        self._wait("stopping the instance", lambda: self.client.stop_instance(id=instance_id))

    def start(self, instance_id: str, progress: Progress) -> None:
        progress("starting the GPU server again")
        self._wait("starting the instance", lambda: self.client.start_instance(id=instance_id))

    def start_if_stopped(self, instance_id: str, progress: Progress) -> None:
        instance = self._call("reading the instance",
                              lambda: self.client.get_instance(id=instance_id))
        if instance.get("state") == "stopped":
            self.start(instance_id, progress)

    def templates(self) -> list[dict]:
        """The organisation's private templates in the zone."""
        return self._call("listing templates",
                          lambda: self.client.list_templates(visibility="private"))["templates"]

    def _wait(self, doing: str, call: Callable[[], dict]) -> dict:
        operation = self._call(doing, call)
        return self._call(doing, lambda: self.client.wait(
            operation["id"], max_wait_time=self.operation_timeout))

    def _call(self, doing: str, call: Callable[[], T]) -> T:
        """The client's answer, or ProvisionError saying what failed (secrets scrubbed)."""
        from exoscale.api.exceptions import ExoscaleAPIAuthException, ExoscaleAPIException

        try:
            return call()
        except ExoscaleAPIAuthException:
            raise ProvisionError(
                f"{doing} failed: Exoscale refused the API credentials (HTTP 403); check "
                "EXOSCALE_API_KEY and EXOSCALE_API_SECRET and the key's IAM role (compute "
                "snapshots and templates)") from None
        except ExoscaleAPIException as exc:
            raise ProvisionError(f"{doing} failed: {secrets.known(str(exc))[:300]}") from None
        except OSError as exc:  # requests' connection errors
            raise ProvisionError(
                f"{doing} failed: the Exoscale API does not answer ({type(exc).__name__})"
            ) from None
