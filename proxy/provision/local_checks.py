"""`ollama-exoscale doctor` with PROXY_PROVISIONER=local: what `local` needs, each with a fix.

The program of PROXY_LOCAL_COMMAND (found and executable, as the provisioner will run it), the
address PROXY_LOCAL_ADDR (free to listen on, or already our own upstream: the provisioner never
adopts a server it did not start) and the state dir (it keeps the pid file there). Only the
program is named, never its arguments: they may hold a token.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import socket
from collections.abc import Mapping

import requests

from infra.doctor import Check, check_state_dir
from proxy.config import Config, ConfigError, split_host_port
from proxy.provision.local import LocalProvisioner, accepts

INSTALL_OLLAMA = (
    "install Ollama (https://ollama.com/download), or set PROXY_LOCAL_COMMAND to the command "
    "that serves Ollama's API, e.g. 'ollama serve'"
)


def run_local_checks(config: Config) -> list[Check]:
    """Every check `local` needs, in the order a person would fix them. Never raises."""
    return [
        check_program(config.local_command, config.env),
        check_address(config),
        check_state_dir(config.state_dir.absolute()),
    ]


def check_program(command: str, env: Mapping[str, str]) -> Check:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return Check("local command", False, f"PROXY_LOCAL_COMMAND cannot be split into words "
                     f"({exc})", "fix its quoting, e.g. PROXY_LOCAL_COMMAND='ollama serve'")
    if not argv:
        return Check("local command", False, "PROXY_LOCAL_COMMAND is empty", INSTALL_OLLAMA)
    program = argv[0]
    # The provisioner starts it with this environment, so with this PATH.
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found:
        return Check("local command", True, f"{program} is {found}")
    if os.sep in program and os.path.exists(program):
        return Check("local command", False, f"{program} is not an executable file",
                     f"`chmod +x {shlex.quote(program)}`, or set PROXY_LOCAL_COMMAND to another "
                     "program")
    where = "does not exist" if os.sep in program else "is not found on PATH"
    return Check("local command", False, f"{program} {where}", INSTALL_OLLAMA)


def check_address(config: Config) -> Check:
    addr = config.local_addr
    try:
        host, port = split_host_port(addr, "PROXY_LOCAL_ADDR")
    except ConfigError as exc:
        return Check("local address", False, str(exc), "set PROXY_LOCAL_ADDR to host:port")
    if _ours(config):
        return Check("local address", True,
                     f"{addr} is served by the upstream this proxy started (still running)")
    problem = _listen_error(host, port)
    in_use = (problem is not None and problem.errno == errno.EADDRINUSE) or \
        (problem is None and accepts(host, port))
    if not in_use and problem is not None:
        return Check("local address", False, f"cannot listen on {addr}: {problem.strerror}",
                     "set PROXY_LOCAL_ADDR to an address of this host, e.g. 127.0.0.1:11435")
    if not in_use:
        return Check("local address", True, f"{addr} is free: the proxy starts its upstream there")
    version = _ollama_version(host, port)
    who = f"an Ollama {version} this proxy did not start" if version else "another program"
    return Check(
        "local address", False, f"{addr} is in use by {who}: the proxy would refuse to start "
        "its own upstream there", "stop that program, or set PROXY_LOCAL_ADDR to a free address "
        "(the proxy starts and stops its own upstream; it never adopts one it did not start)",
    )


def _ours(config: Config) -> bool:
    """Whether the upstream recorded in the state dir (by a running proxy) is alive."""
    try:
        provisioner = LocalProvisioner(config.local_command, config.local_addr,
                                       config.state_dir, config.env)
    except (ConfigError, ValueError):
        return False
    return provisioner.observe() is not None


def _listen_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port now (None: it could)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            sock.bind((host, port))
    except OSError as exc:
        return exc
    return None


def _ollama_version(host: str, port: int) -> str:
    """The version an Ollama at host:port reports, or "" when it does not answer as one."""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        answer = requests.get(f"http://{netloc}/api/version", timeout=2,
                              allow_redirects=False)
        version = answer.json().get("version") if answer.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError):
        return ""
    return version if isinstance(version, str) else ""
