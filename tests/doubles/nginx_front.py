"""The GPU server's public front as cloud-init leaves it: Debian's nginx with the rendered site.

It follows what a real server runs, from the user data `infra/cloudinit.py` renders:
cloud-init's `write_files` (cloud-init's docs, "Write Files" module) put the site
(`cloud-init/nginx-site.conf`), the TLS certificate and key, and the progress script on the
disk; `setup.sh`'s `open_front` links the site into `sites-enabled`, checks it with `nginx -t`
and starts nginx, whose main config is the distribution's `/etc/nginx/nginx.conf` (Debian's and
Ubuntu's: `user www-data`, an `http` block that includes `sites-enabled/*`). The site is used
as rendered, token check, 503-until-ready gate and progress route included.

What differs, so that it runs as a test on a shared machine (never as a daemon, never on a
public address):
- the server's absolute paths (`/etc/ollama-exoscale`, `/var/lib/ollama-exoscale`, ...) live
  under a folder standing for its disk (`disk`), and the site's copies of them are rewritten;
- Ollama's loopback port (`127.0.0.1:11434`) becomes the test's, and the public port is bound
  on a loopback address only (127.0.0.1, or a simulated instance's own 127.0.0.N; the IPv6
  listener is left out);
- the main config is written per run: `daemon off`, pid, error log and temp paths under its own
  prefix, started as `nginx -p PREFIX -e ERROR_LOG -c CONF`, so any user can run it.

Run as root, nginx's workers are `www-data` as on the server: the disk must be reachable by them
(`make_disk()` makes one under the system's temp dir, mode 0755), and the progress document
must be world-readable, as `cloud-init/progress.py` makes it.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

NGINX = "/usr/sbin/nginx"  # Debian's nginx package (`./dev test` installs it)
SITE = "/etc/ollama-exoscale/nginx-site.conf"
STATE_DIR = "/var/lib/ollama-exoscale"
OLLAMA_ADDRESS = "127.0.0.1:11434"  # where setup.sh publishes Ollama, and the site sends to
# Debian's /etc/nginx/nginx.conf, less what is the machine's (modules, logs, pid): see above.
MAIN_CONFIG = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;

events {{
    worker_connections 768;
}}

http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    access_log {prefix}/access.log;
    gzip on;
{temp_paths}
    include {prefix}/sites-enabled/*;
}}
"""
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx() -> str:
    """Debian's nginx binary, or a failure that says how to get it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found:
        raise FileNotFoundError(f"{NGINX} is missing: apt-get install nginx (./dev test does)")
    return found


def make_disk(prefix: str = "gpu-server-") -> Path:
    """A folder standing for a server's disk, that nginx's workers (`www-data`) can reach."""
    disk = Path(tempfile.mkdtemp(prefix=prefix))
    disk.chmod(0o755)
    return disk


def on_disk(disk: Path, path: str) -> Path:
    """Where the server's absolute `path` lives under `disk`."""
    return disk / path.lstrip("/")


def contents(entry: dict) -> bytes:
    """An entry's bytes as cloud-init decodes them (cloudinit/config/cc_write_files.py,
    `canonicalize_extraction` and `extract_contents`): plain text, base64, gzip+base64;
    an encoding it does not know is refused here (cloud-init would write it undecoded)."""
    encoding = (entry.get("encoding") or "text/plain").lower().strip()
    data = entry["content"]
    if encoding in ("gz+base64", "gzip+base64", "gz+b64", "gzip+b64"):
        return gzip.decompress(base64.b64decode(data))
    if encoding in ("b64", "base64"):
        return base64.b64decode(data)
    if encoding == "text/plain":
        return data.encode()
    raise ValueError(f"write_files encoding {encoding!r} is not one cloud-init decodes")


def write_files(user_data: str, disk: Path) -> dict[str, Path]:
    """cloud-init's `write_files` of `user_data`, under `disk`, each with its permissions;
    returns the server's path -> the file written."""
    written = {}
    for entry in yaml.safe_load(user_data)["write_files"]:
        target = on_disk(disk, entry["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        for folder in _parents_below(target.parent, disk):
            folder.chmod(0o755)  # cloud-init makes missing folders 0755 too
        target.write_bytes(contents(entry))
        target.chmod(int(entry.get("permissions", "0644"), 8))
        written[entry["path"]] = target
    return written


def local_site(site: str, disk: Path, ollama_port: int, port: int, host: str = "127.0.0.1"
               ) -> str:
    """The rendered site with the server's paths under `disk`, Ollama at `ollama_port` and the
    public port `port` on `host` (a loopback address). Refuses a site these rewrites would not
    cover."""
    listens = re.findall(r"^\s*listen (\d+) ssl;$", site, flags=re.M)
    if len(listens) != 1 or OLLAMA_ADDRESS not in site:
        raise ValueError("the rendered site no longer has one `listen PORT ssl;` and "
                         f"`proxy_pass http://{OLLAMA_ADDRESS}`: update this double")
    site = re.sub(r"^(\s*)listen \d+ ssl;$", rf"\g<1>listen {host}:{port} ssl;", site,
                  flags=re.M)
    site = re.sub(r"^(\s*)listen \[::\]:\d+ ssl;$", r"\g<1># (IPv6 left out here)", site,
                  flags=re.M)
    site = site.replace(f"http://{OLLAMA_ADDRESS}", f"http://127.0.0.1:{ollama_port}")
    for server_path in ("/etc/ollama-exoscale", STATE_DIR):
        site = site.replace(server_path, str(on_disk(disk, server_path)))
    return site


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, log: Path,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                errors = log.read_text() if log.exists() else ""
                raise RuntimeError(f"nginx did not start on {host}:{port}: {errors}") from None
            time.sleep(0.05)


class Front:
    """nginx serving the site `disk` holds (written there by `write_files`), on host:port (a
    loopback address: 127.0.0.1 unless a simulated instance has another), in front of an
    Ollama at 127.0.0.1:ollama_port. Its prefix is `disk/run/nginx`."""

    def __init__(self, disk: Path, ollama_port: int, port: int, host: str = "127.0.0.1"):
        self.disk = Path(disk)
        self.port = port
        self.host = host
        self.prefix = on_disk(self.disk, "/run/nginx")
        site = on_disk(self.disk, SITE).read_text()
        self.site = local_site(site, self.disk, ollama_port, port, host)
        self.process: subprocess.Popen | None = None

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def configure(self) -> Path:
        """The main config and the enabled site under the prefix; returns the main config."""
        enabled = self.prefix / "sites-enabled"
        enabled.mkdir(parents=True, exist_ok=True)
        self.prefix.chmod(0o755)
        link = enabled / "ollama-exoscale"
        link.write_text(self.site)  # a copy, not setup.sh's link: the paths are rewritten
        link.chmod(0o600)  # it holds the token, as on the server
        temp_paths = "\n".join(f"    {kind}_temp_path {self.prefix}/{kind};" for kind in TEMP_KINDS)
        user = "user www-data;\n" if os.geteuid() == 0 else ""  # nginx ignores it otherwise
        main = self.prefix / "nginx.conf"
        main.write_text(MAIN_CONFIG.format(user=user, prefix=self.prefix, temp_paths=temp_paths))
        return main

    def command(self, *flags: str) -> list[str]:
        main = self.configure()
        return [nginx(), "-p", str(self.prefix), "-e", str(self.error_log), "-c", str(main),
                *flags]

    def check(self) -> None:
        """`nginx -t`, as setup.sh runs it before starting the front."""
        checked = subprocess.run(self.command("-t", "-q"), capture_output=True, text=True,
                                 timeout=60)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t refused the site: {checked.stderr.strip()}")

    def start(self, timeout: float = 10.0) -> Front:
        self.check()
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.process, timeout, self.error_log, self.host)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (nginx's fast stop), then SIGKILL if it has not ended within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parents_below(folder: Path, top: Path) -> list[Path]:
    """`folder` and its parents up to (not including) `top`."""
    found = []
    while folder != top and top in folder.parents:
        found.append(folder)
        folder = folder.parent
    return found
