"""The names a GPU server's resources get, from the server's name (gpu, gpu-1, ...).

`gpu` keeps the names of the one server before fleets (instance `gpu`, volume `models`, the
stack's object name in the cloud), so a stack made then keeps its instance; the others are
named after themselves. The program names its resources with these, and reading a state
back (which servers hold an instance or a volume) goes the other way.
"""

from __future__ import annotations

from infra.checks import PRIMARY, server_index

VOLUME_PREFIX = "models"


def model_volume_name(server: str) -> str:
    """A server's model volume's logical name: `models` for gpu, `models-gpu-1`, ..."""
    return VOLUME_PREFIX if server == PRIMARY else f"{VOLUME_PREFIX}-{server}"


def volume_server(logical_name: str) -> str | None:
    """The server a model volume of that logical name belongs to (None: not one of ours)."""
    if logical_name == VOLUME_PREFIX:
        return PRIMARY
    prefix, dash, server = logical_name.partition("-")
    if prefix != VOLUME_PREFIX or not dash or server == PRIMARY:
        return None
    try:
        server_index(server)
    except ValueError:
        return None
    return server


def server_object_name(name: str, server: str) -> str:
    """A server's cloud name: the stack's objects' name, plus the server unless it is `gpu`."""
    if server == PRIMARY:
        return name
    suffix = f"-{server}"
    return name[:63 - len(suffix)].rstrip("-") + suffix  # a hostname label
