"""Renders the GPU server's cloud-config (user data) from the templates in `cloud-init/`.

`cloud-init/user-data.yaml` is the skeleton: the files cloud-init writes and the unit it
starts. Each file's content is a `{{ name }}` placeholder for a file of that folder (itself a
template) or for the TLS certificate and key. Values are quoted for the place they land in:
`shlex.quote` in the shell script, a checked charset in nginx's config; the YAML itself is
written by PyYAML, never by string pasting.
"""

from __future__ import annotations

import base64
import gzip
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from .settings import Settings

# The name in the self-signed certificate: the proxy pins the certificate and verifies this
# name, since the instance's address is not known when the certificate is made.
TLS_SERVER_NAME = "ollama-exoscale.invalid"
OLLAMA_IMAGE = "ollama/ollama"
STATE_DIR = "/var/lib/ollama-exoscale"  # the setup script's: progress document, ready marker
HEADER = "#cloud-config\n# ollama-exoscale: rendered by infra/cloudinit.py from cloud-init/\n"
# The provider base64-encodes the user data and refuses 32768 encoded bytes or more
# (terraform-provider-exoscale 0.66.0 pkg/utils/utils.go `EncodeUserData`,
# `ComputeMaxUserDataLength`): about 24 KB of cloud-config.
MAX_USER_DATA_BYTES = 32768

_PLACEHOLDER = re.compile(r"\{\{ *([A-Za-z0-9_.-]+) *\}\}")
# RFC 6750's token68: safe inside nginx's double quotes (no `"`, `$`, `\`, space or `;`).
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]{16,}=*$")
_PEM = re.compile(r"^-----BEGIN ([A-Z0-9 ]+)-----\n[A-Za-z0-9+/=\n]+-----END \1-----\n?$")


def template_dir() -> Path:
    """The `cloud-init/` folder: next to `infra/` in a checkout (or an editable install), else
    the copy a wheel installs under `<prefix>/share/ollama-exoscale/cloud-init`."""
    beside = Path(__file__).resolve().parent.parent / "cloud-init"
    if (beside / "user-data.yaml").is_file():
        return beside
    installed = Path(sys.prefix) / "share" / "ollama-exoscale" / "cloud-init"
    if (installed / "user-data.yaml").is_file():
        return installed
    raise FileNotFoundError(
        f"the cloud-init templates are missing: looked in {beside} and {installed}"
    )


def render_user_data(settings: Settings, token: str, tls_cert_pem: str, tls_key_pem: str) -> str:
    """The `#cloud-config` document for the GPU server of `settings`."""
    _check_token(token)
    files = {
        "setup.sh": fill(_read("setup.sh"), _shell_values(settings)),
        "nginx-site.conf": fill(_read("nginx-site.conf"), _nginx_values(settings, token)),
        "ollama-exoscale-setup.service": _read("ollama-exoscale-setup.service"),
        "progress.py": _read("progress.py"),
        "tls.crt": _checked_pem("TLS certificate", tls_cert_pem),
        "tls.key": _checked_pem("TLS private key", tls_key_pem),
    }
    config = yaml.safe_load(_read("user-data.yaml"))
    for entry in config["write_files"]:
        entry["content"] = compressed(fill(entry["content"], files))
        entry["encoding"] = "gz+b64"  # cloud-init's write_files decodes it (cc_write_files.py)
    rendered = HEADER + yaml.dump(
        config, Dumper=_BlockDumper, sort_keys=False, width=1000, allow_unicode=False
    )
    encoded = encoded_size(rendered)
    if encoded >= MAX_USER_DATA_BYTES:
        raise ValueError(
            f"the GPU server's user data is {encoded} bytes base64-encoded, and the Exoscale "
            f"provider refuses {MAX_USER_DATA_BYTES} or more: the models list (OLLAMA_MODEL, "
            f"{len(settings.models)} names) makes it too long; list fewer models"
        )
    return rendered


def compressed(content: str) -> str:
    """`content` gzipped, in base64: about a third of the size, so the scripts (kept readable,
    comments and all) leave room in the provider's limit for the models list. mtime=0 and a
    fixed level keep the bytes the same from one render to the next, as the stack compares them
    (new user data replaces the instance)."""
    return base64.b64encode(gzip.compress(content.encode(), compresslevel=9, mtime=0)).decode()


def decompressed(entry: Mapping[str, str]) -> str:
    """A write_files entry's content as cloud-init writes it (plain, or gz+b64)."""
    if entry.get("encoding") == "gz+b64":
        return gzip.decompress(base64.b64decode(entry["content"])).decode()
    return entry["content"]


def encoded_size(user_data: str) -> int:
    """The user data's length as the provider sends it: base64 of the UTF-8 bytes."""
    return 4 * -(-len(user_data.encode()) // 3)


def fill(template: str, values: Mapping[str, str]) -> str:
    """`template` with each `{{ name }}` replaced by `values[name]`; an unknown name is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"the cloud-init templates use {{{{ {name} }}}}, which has no value")
        return values[name]

    return _PLACEHOLDER.sub(value, template)


def _shell_values(settings: Settings) -> dict[str, str]:
    return {
        "models": " ".join(shlex.quote(model) for model in settings.models),
        "port": str(int(settings.port)),
        "ollama_image": shlex.quote(OLLAMA_IMAGE),
        "state_dir": shlex.quote(STATE_DIR),
        "model_volume": "1" if settings.model_volume_gb else "0",
    }


def _nginx_values(settings: Settings, token: str) -> dict[str, str]:
    port = int(settings.port)
    return {
        "port": str(port),
        # Clients come over IPv6 only if an allowed network is IPv6 (the instance gets an address).
        "listen_ipv6": f"listen [::]:{port} ssl;" if settings.ipv6 else "# IPv4 clients only",
        "server_name": TLS_SERVER_NAME,
        "token": token,
        "state_dir": STATE_DIR,
    }


def _check_token(token: str) -> None:
    if not isinstance(token, str) or not _TOKEN.match(token):
        # Never show the token itself.
        raise ValueError(
            "the bearer token must be at least 16 characters of letters, digits and -._~+/"
        )


def _checked_pem(what: str, pem: str) -> str:
    pem = pem.replace("\r\n", "\n").strip() + "\n"
    if not _PEM.match(pem):
        raise ValueError(f"the {what} is not a PEM block")
    return pem


def _read(name: str) -> str:
    return (template_dir() / name).read_text(encoding="utf-8")


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks (`|`), so the user data stays readable."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _represent_str)
