"""The lifecycle's phases, of the primary server and of each fleet server."""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    """The lifecycle's phases; a str, so the JSON document and old stores read the same."""

    IDLE = "idle"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    READY = "ready"
    DESTROYING = "destroying"
    ERROR = "error"
    BAKING = "baking"  # the server is stopped and snapshotted into a template (bake)

    def __str__(self) -> str:
        return self.value
