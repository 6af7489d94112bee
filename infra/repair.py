"""Crash repair: what an interrupted update left in the stack's state, and adopting it.

A process killed mid-`up` leaves "pending creates" in the state: the cloud object may exist
while the state does not know it. Here, on the exported deployment (plain dicts, no CLI):
which creates are pending, a read-only program that finds an instance by name and labels,
and the deployment with the instance adopted under the provider's import ID.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pulumi

from infra.names import volume_server

INSTANCE_TYPE = "exoscale:index/computeInstance:ComputeInstance"
VOLUME_TYPE = "exoscale:index/blockStorageVolume:BlockStorageVolume"


@dataclass(frozen=True)
class PendingCreate:
    """A create the engine started but never saw finish (its process died)."""

    urn: str
    type: str
    name: str  # the cloud object's name, as the program gave it
    zone: str
    labels: Mapping[str, str] = field(default_factory=dict)


def pending_creates(deployment: Mapping[str, Any]) -> list[PendingCreate]:
    """Creates an interrupted update left in `deployment`: the object may exist in the cloud."""
    found = []
    for operation in deployment.get("pending_operations") or []:
        if operation.get("type") != "creating":
            continue
        resource = operation.get("resource") or {}
        inputs = resource.get("inputs") or {}
        labels = inputs.get("labels") if isinstance(inputs.get("labels"), dict) else {}
        found.append(PendingCreate(
            urn=resource.get("urn", ""), type=resource.get("type", ""),
            name=_plain(inputs.get("name")), zone=_plain(inputs.get("zone")),
            labels={k: _plain(v) for k, v in labels.items()},
        ))
    return found


def instance_states(deployment: Mapping[str, Any]) -> dict[str, str]:
    """Each compute instance of `deployment`'s resources by its logical name (the server's
    name: gpu, gpu-1, ...), with the state last declared or read back (running | stopped)."""
    found = {}
    for resource in deployment.get("resources") or []:
        if not isinstance(resource, dict) or resource.get("type") != INSTANCE_TYPE:
            continue
        inputs = resource.get("inputs") or {}
        outputs = resource.get("outputs") or {}
        state = _plain(inputs.get("state")) or _plain(outputs.get("state")) or "running"
        found[_urn(resource).rsplit("::", 1)[-1]] = state
    return found


def volume_servers(deployment: Mapping[str, Any]) -> list[str]:
    """The servers whose model volume `deployment`'s resources hold (kept or attached)."""
    found = []
    for resource in deployment.get("resources") or []:
        if isinstance(resource, dict) and resource.get("type") == VOLUME_TYPE:
            server = volume_server(_urn(resource).rsplit("::", 1)[-1])
            if server is not None:
                found.append(server)
    return found


def instance_lookup(pending: PendingCreate) -> None:
    """A program that only reads: exports `ids`, the compute instances with the name and
    labels of `pending` in its zone (the Exoscale provider's `getComputeInstanceList`)."""
    import pulumiverse_exoscale as exoscale  # the provider SDK only when it is needed

    found = exoscale.get_compute_instance_list_output(
        zone=pending.zone, name=pending.name, labels=dict(pending.labels) or None
    )
    pulumi.export("ids", found.instances.apply(lambda xs: [x.id for x in xs or []]))


def adopted(deployment: Mapping[str, Any], pending: PendingCreate, object_id: str
            ) -> dict[str, Any] | None:
    """`deployment` with `pending` recorded as having created `object_id`; None if it is no
    longer pending.

    The resource goes into the state with the provider's import ID, `<ID>@<ZONE>`
    (terraform-provider-exoscale pkg/utils/utils.go `ZonedStateContextFunc`), and no
    outputs: a refresh reads a resource with empty state as an import (pulumi-terraform-
    bridge pkg/tfbridge/provider.go `Read` runs the importer), which sets the bare ID and
    every output. With the bare ID that import fails ("expected format <ID>@<ZONE>").

    Not `refresh --import-pending-creates URN ID` (pulumi/pulumi
    pkg/cmd/pulumi/operations/refresh.go), though the low-level `pulumi.automation.
    interface` API passes it: it only turns the pending create into a pending `importing`
    operation, and the refresh that follows refreshes the state's resources alone
    (pkg/resource/deploy/deployment_executor.go) and carries only pending creates into
    the new state (pkg/backend/journal.go): the instance would be forgotten, and the next
    `up` would create a second one. The state is edited through `stack export` and
    `stack import` instead, as Pulumi's troubleshooting guide describes.
    """
    operations = deployment.get("pending_operations") or []
    match = [op for op in operations if _urn(op.get("resource")) == pending.urn]
    if not match:
        return None
    resources = [r for r in deployment.get("resources") or [] if _urn(r) != pending.urn]
    resource = {**match[0]["resource"], "id": f"{object_id}@{pending.zone}"}
    resource.pop("outputs", None)  # empty state: the refresh imports it
    return {**deployment, "pending_operations": [op for op in operations if op not in match],
            "resources": [*resources, resource]}


def _urn(resource: Any) -> str:
    return resource.get("urn", "") if isinstance(resource, dict) else ""


def _plain(value: Any) -> str:
    """A state property as text (secret-wrapped values keep their plaintext)."""
    if isinstance(value, dict):
        value = value.get("plaintext", value.get("value", ""))
    return "" if value is None else str(value).strip('"')
