"""The clouds behind the stand-in's providers: Exoscale (simulated), random, tls.

Exoscale objects live in `standin-cloud.json` in the backend directory, so a test can count the
instances that exist whatever Pulumi's state says. A compute instance boots from its user data:
`python -m tests.doubles.standin_pulumi.server` (in a session of its own) writes the user
data's files on a folder standing for its disk and runs the bring-up, so its public front is
Debian's nginx with the site the program rendered (TLS with the stack's certificate, the bearer
token, the 503-until-ready gate, the progress route) in front of the test Ollama; deleting or
stopping the instance stops that process group. `random` and `tls` resources exist only in the
state, as with the real providers; their keys and certificates are real (made with the
`openssl` command)."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.doubles.nginx_front import make_disk

from .backend import CliError, now_text, reveal, secret

REPO = Path(__file__).resolve().parents[3]
INSTANCE = "exoscale:index/computeInstance:ComputeInstance"
SECURITY_GROUP = "exoscale:index/securityGroup:SecurityGroup"
SECURITY_GROUP_RULE = "exoscale:index/securityGroupRule:SecurityGroupRule"
VOLUME = "exoscale:index/blockStorageVolume:BlockStorageVolume"
PASSWORD = "random:index/randomPassword:RandomPassword"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
CERT = "tls:index/selfSignedCert:SelfSignedCert"
EXOSCALE_OBJECTS = {INSTANCE: "instances", SECURITY_GROUP: "groups", SECURITY_GROUP_RULE: "rules",
                    VOLUME: "volumes"}
# The provider's zones (terraform-provider-exoscale 0.66.0 pkg/config/config.go `Zones`) and
# its user data limit (`ComputeMaxUserDataLength`).
PROVIDER_ZONES = ["ch-gva-2", "ch-dk-2", "at-vie-1", "at-vie-2", "de-fra-1", "bg-sof-1",
                  "de-muc-1", "hr-zag-1"]
MAX_USER_DATA = 32768
# The public templates `getTemplate` finds by name (STANDIN_TEMPLATES: others, comma-separated).
PUBLIC_TEMPLATES = ",".join(("Linux Ubuntu 24.04 LTS 64-bit", "Linux Ubuntu 22.04 LTS 64-bit",
                             "Linux Debian 12 (Bookworm) 64-bit"))
# What Exoscale's API v2 keeps beside the provider's objects (tests/doubles/exoscale_api.py):
# snapshots of instances, the private templates made from them, and the async operations.
API_OBJECTS = ("snapshots", "templates", "operations")
# What the simulated machine keeps in an instance's record, not the provider's outputs.
MACHINE = ("pid", "port", "disk", "models_dir")
# Inputs whose change the Exoscale provider applies in place; any other change replaces.
IN_PLACE = {INSTANCE: {"type", "diskSize", "labels", "name", "state", "securityGroupIds"}}


class StepError(Exception):
    """A provider operation failed; the message is the provider's."""


class Cloud:
    def __init__(self, backend_root: Path, env: dict[str, str]):
        self.path = backend_root / "standin-cloud.json"
        self.files = backend_root / "standin-cloud"
        self.env = env

    @contextlib.contextmanager
    def objects(self) -> Iterator[dict]:
        """Read-modify-write of the simulated Exoscale account, under a file lock."""
        self.files.mkdir(parents=True, exist_ok=True)
        with open(self.files / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            for kind in (*EXOSCALE_OBJECTS.values(), *API_OBJECTS):
                data.setdefault(kind, {})
            yield data
            scratch = self.path.with_suffix(".tmp")
            scratch.write_text(json.dumps(data, indent=2))
            scratch.replace(self.path)

    # -- the provider operations the engine calls -------------------------------------------

    def check(self, package: str) -> None:
        """Configure the provider: the Exoscale one needs API credentials."""
        if package == "exoscale" and not (
            self.env.get("EXOSCALE_API_KEY") and self.env.get("EXOSCALE_API_SECRET")
        ):
            raise StepError(
                "Exoscale API credentials are missing: set EXOSCALE_API_KEY and "
                "EXOSCALE_API_SECRET (or the provider config exoscale:key and exoscale:secret)"
            )

    def create(self, type_: str, inputs: dict, stack: list[dict]) -> tuple[str, dict]:
        plain = reveal(inputs)
        if type_ == PASSWORD:
            return "none", {**inputs, **_password(plain)}
        if type_ == PRIVATE_KEY:
            return _private_key(plain, inputs)
        if type_ == CERT:
            return _self_signed_cert(plain, inputs)
        if type_ == INSTANCE:
            return self._create_instance(plain, inputs, stack)
        if type_ in EXOSCALE_OBJECTS:
            object_id = str(uuid.uuid4())
            with self.objects() as data:
                data[EXOSCALE_OBJECTS[type_]][object_id] = plain
            return object_id, dict(inputs)
        return str(uuid.uuid4()), dict(inputs)

    def check_inputs(self, type_: str, inputs: dict) -> None:
        """The provider's checks of a compute instance's inputs, before any API call
        (terraform-provider-exoscale 0.66.0 pkg/resources/instance/resource.go, its
        validators in pkg/utils/utils.go)."""
        if type_ != INSTANCE:
            return
        plain = reveal(inputs)
        zone, kind = plain.get("zone"), plain.get("type") or ""
        if zone not in PROVIDER_ZONES:  # validation.StringInSlice(config.Zones)
            raise StepError(f"expected zone to be one of {json.dumps(PROVIDER_ZONES)}, "
                            f"got {zone}")
        if "." not in kind:  # ValidateComputeInstanceType
            raise StepError(f'invalid value "{kind}", expected format "FAMILY.SIZE"')
        if int(plain.get("diskSize") or 0) < 10:  # validation.IntAtLeast(10)
            raise StepError(f"expected disk_size to be at least (10), got {plain.get('diskSize')}")
        _check_user_data(plain.get("userData") or "")

    def update(self, type_: str, object_id: str, old_inputs: dict, inputs: dict,
               outputs: dict) -> dict:
        if type_ == INSTANCE:
            self._update_instance(object_id, reveal(old_inputs), reveal(inputs))
        elif type_ in EXOSCALE_OBJECTS:
            with self.objects() as data:
                data[EXOSCALE_OBJECTS[type_]].setdefault(object_id, {}).update(reveal(inputs))
        return {**outputs, **inputs}

    def read(self, type_: str, object_id: str, outputs: dict) -> tuple[str, dict] | None:
        """The object's ID and outputs now; None if it is gone (state-only resources never are).

        With no outputs it is an import: the Terraform bridge runs the provider's importer
        (pulumi-terraform-bridge pkg/tfbridge/provider.go `Read`), and a compute instance's
        importer takes only `<ID>@<ZONE>` (terraform-provider-exoscale 0.66.0
        pkg/utils/utils.go `ZonedStateContextFunc`, the "Import" section of its compute
        instance docs), then reads the instance by its bare ID.
        """
        if type_ not in EXOSCALE_OBJECTS:
            return object_id, outputs
        zone = None
        if type_ == INSTANCE and not outputs:
            object_id, at, zone = object_id.partition("@")
            if not at or not object_id or not zone:
                raise StepError(f'invalid ID "{object_id}{at}{zone}", expected format '
                                '"<ID>@<ZONE>"')
        with self.objects() as data:
            found = data[EXOSCALE_OBJECTS[type_]].get(object_id)
        if found is None or (zone is not None and found.get("zone") != zone):
            return None
        if type_ == INSTANCE:
            return object_id, {**outputs, **_instance_outputs(found)}
        return object_id, {**outputs, **{k: v for k, v in found.items() if k in outputs}}

    def delete(self, type_: str, object_id: str) -> None:
        if type_ not in EXOSCALE_OBJECTS:
            return
        with self.objects() as data:
            found = data[EXOSCALE_OBJECTS[type_]].pop(object_id, None)
        if type_ == INSTANCE and found:
            stop_server(found)

    def invoke(self, token: str, args: dict) -> dict:
        if token == "exoscale:index/getTemplate:getTemplate":
            name = args.get("name") or "Linux Ubuntu 24.04 LTS 64-bit"
            visibility = args.get("visibility") or "public"
            if visibility not in ("public", "private"):  # the API's `list-templates` enum
                raise StepError(f"invoking exoscale:index/getTemplate:getTemplate: invalid "
                                f"visibility {visibility!r}")
            if visibility == "private":  # the organisation's own, e.g. promoted snapshots
                return self._private_template(name, args.get("zone"))
            known = (self.env.get("STANDIN_TEMPLATES") or PUBLIC_TEMPLATES).split(",")
            if name not in known:  # egoscale v2 GetTemplateByName finds none: ErrNotFound
                raise StepError("invoking exoscale:index/getTemplate:getTemplate: resource "
                                "not found")
            template_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{args.get('zone')}/{name}"))
            return {
                "id": template_id, "name": name, "zone": args.get("zone"),
                "defaultUser": "ubuntu", "visibility": args.get("visibility") or "public",
            }
        if token == "exoscale:index/getComputeInstanceList:getComputeInstanceList":
            with self.objects() as data:
                instances = data["instances"]
            found = [
                {**_instance_outputs(record), "id": object_id}
                for object_id, record in instances.items()
                if _matches(args.get("name"), record.get("name"))
                and record.get("zone") == args.get("zone")
                and all(
                    _matches(want, (record.get("labels") or {}).get(key))
                    for key, want in (args.get("labels") or {}).items()
                )
            ]
            return {"id": args.get("zone"), "zone": args.get("zone"), "instances": found}
        raise StepError(f"unknown function {token}")

    def _private_template(self, name: str, zone: str | None) -> dict:
        """The newest private template of that name in the zone (the provider's data source:
        "when multiple templates have the same name, the newest one will be returned")."""
        with self.objects() as data:
            found = [(t["created-at"], template_id, t)
                     for template_id, t in data["templates"].items()
                     if t["name"] == name and zone in t["zones"]]
        if not found:
            raise StepError("invoking exoscale:index/getTemplate:getTemplate: resource not found")
        _, template_id, template = max(found)
        return {"id": template_id, "name": name, "zone": zone,
                "defaultUser": template.get("default-user") or "", "visibility": "private"}

    # -- the compute instance ---------------------------------------------------------------

    def _create_instance(self, plain: dict, inputs: dict, stack: list[dict]) -> tuple[str, dict]:
        failure = self.env.get("STANDIN_FAIL_UP")
        switch = self.env.get("STANDIN_FAIL_UP_FILE")  # a test removes it to let `up` succeed
        if switch and os.path.exists(switch):
            failure = open(switch).read().strip() or "simulated failure"
        if failure:
            raise StepError(f"creating Compute instance: {failure}")
        object_id = str(uuid.uuid4())
        disk = make_disk(prefix=f"standin-{object_id[:8]}-")
        with self.objects() as data:
            template = data["templates"].get(plain.get("templateId") or "")
            address = _free_address(data["instances"])  # creates come one at a time
        if template is not None:  # a private template: its disk is the snapshot's, copied
            shutil.copytree(template["disk"], disk, symlinks=True, dirs_exist_ok=True)
        (disk / "user-data").write_text(plain.get("userData") or "")
        record = {
            **plain,
            "publicIpAddress": address,
            "port": self._port(plain, stack),
            "disk": str(disk),
            "createdAt": now_text(),
            "state": plain.get("state") or "running",
        }
        # Ollama's models: on an attached volume if there is one (a kept one already has them).
        models_dir = disk / "var/lib/docker/volumes/ollama"
        for volume_id in plain.get("blockStorageVolumeIds") or []:
            models_dir = self.files / f"volume-{volume_id}"
        record["models_on_volume"] = (models_dir / "pulled").exists()
        record["models_dir"] = str(models_dir)
        if record["state"] == "running":
            record["pid"] = self.boot(object_id, record)
        with self.objects() as data:
            data["instances"][object_id] = record
        return object_id, {**inputs, **_instance_outputs(record)}

    def _update_instance(self, object_id: str, old: dict, new: dict) -> None:
        """The provider's update of `state`, `diskSize` and `type` (0.66.0 resource.go,
        `rUpdate`): it stops the instance without reading its state first, so the API refuses
        when it is stopped already (fixed only in the Terraform provider 0.69.3); then it
        starts it if `running` is declared. A stopped instance's server stops; started
        again, it boots on its own disk."""
        changed = {k for k in ("state", "diskSize", "type") if old.get(k) != new.get(k)}
        stop = bool(changed) and (new.get("state") == "stopped" or bool(changed - {"state"}))
        with self.objects() as data:
            record = data["instances"][object_id]
            actual, pid = record.get("state") or "running", record.get("pid")
            if stop and actual != "running":
                raise StepError("unable to stop instance: Only running instances can be stopped")
            record.update(new)
            if stop:
                record["state"], record["pid"], actual = "stopped", None, "stopped"
            start = bool(changed) and new.get("state", "running") == "running"
            if start and actual == "stopped":
                record["state"] = "running"
                record["pid"] = self.boot(object_id, record)  # its disk keeps what it pulled
        if stop and pid:
            stop_process(pid)

    def _port(self, plain: dict, stack: list[dict]) -> int:
        if self.env.get("STANDIN_INSTANCE_PORT"):
            return int(self.env["STANDIN_INSTANCE_PORT"])
        groups = set(plain.get("securityGroupIds") or [])
        for resource in stack:
            rule = resource.get("inputs") or {}
            if resource["type"] == SECURITY_GROUP_RULE and rule.get("securityGroupId") in groups:
                port = int(rule.get("startPort") or 0)
                if port and port != 22:
                    return port
        raise StepError("the stand-in cannot tell the instance's port: open it in a rule")

    def boot(self, object_id: str, record: dict) -> int:
        """Start the instance's server (tests/doubles/standin_pulumi/server.py) on its disk.

        Its front listens once STANDIN_BOOT_DELAY has passed; each model it lacks takes
        STANDIN_PULL_SECONDS to pull (none when its disk or volume has it already).
        """
        disk = Path(record["disk"])
        (disk / "boot.json").write_text(json.dumps({
            "instance_id": object_id,  # what cloud-init keys its once-per-instance work on
            "address": record["publicIpAddress"],
            "port": record["port"],
            "boot_delay": float(self.env.get("STANDIN_BOOT_DELAY") or 0),
            "pull_seconds": float(self.env.get("STANDIN_PULL_SECONDS") or 0),
            "gives_up": self.env.get("STANDIN_GIVES_UP") or "",
            "models_dir": record["models_dir"],
        }))
        with open(self.files / f"{object_id}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.doubles.standin_pulumi.server", str(disk)],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # the server outlives the CLI, like a real one
            )
        return process.pid


def _check_user_data(user_data: str) -> None:
    """The provider's `EncodeUserData` (0.66.0 pkg/utils/utils.go): gzip is refused, base64 is
    sent as it is, anything else is base64-encoded and refused at `ComputeMaxUserDataLength`."""
    raw = user_data.encode()
    if raw[:2] == b"\x1f\x8b":
        raise StepError("user_data appears to be gzipped: it should be left raw, or also be "
                        "base64 encoded")
    try:
        base64.b64decode(raw, validate=True)
        return
    except ValueError:
        pass
    if len(base64.b64encode(raw)) >= MAX_USER_DATA:
        raise StepError(f"user-data maximum allowed length is {MAX_USER_DATA} bytes")


def _free_address(instances: dict) -> str:
    """A public address no instance holds. An Exoscale instance has a public IPv4 address of
    its own (the API's `public-ip-assignment` `inet4`, the provider's `public_ip_address`); a
    simulated one gets a loopback address of its own, 127.0.0.1 first, so that several serve
    one port side by side, as several GPU servers behind one firewall rule do."""
    taken = {record.get("publicIpAddress") for record in instances.values()}
    for n in range(1, 255):
        if f"127.0.0.{n}" not in taken:
            return f"127.0.0.{n}"
    raise StepError("creating Compute instance: the stand-in has no loopback address left")


def _instance_outputs(record: dict) -> dict:
    keep = {k: v for k, v in record.items() if k not in MACHINE}
    return {**keep, "ipv6": False, "ipv6Address": "", "privateNetworkIds": [], "reverseDns": ""}


def _matches(pattern: str | None, value: str | None) -> bool:
    """The Exoscale list filters: exact, or a regex between slashes."""
    if not pattern:
        return True
    if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
        return re.search(pattern[1:-1], value or "") is not None
    return pattern == value


def stop_server(record: dict) -> None:
    """The instance is gone: its server stopped, its disk removed."""
    if record.get("pid"):
        stop_process(record["pid"])
    if record.get("disk"):
        shutil.rmtree(record["disk"], ignore_errors=True)


def stop_process(pid: int) -> None:
    """Stop the instance's process group: SIGTERM, then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if _zombie(pid):
                return  # it has exited; its parent (init) reaps it
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


# -- random ----------------------------------------------------------------------------------


def _password(plain: dict) -> dict:
    length = int(plain.get("length") or 16)
    alphabet = ""
    if plain.get("upper", True):
        alphabet += string.ascii_uppercase
    if plain.get("lower", True):
        alphabet += string.ascii_lowercase
    if plain.get("numeric", plain.get("number", True)):
        alphabet += string.digits
    if plain.get("special", True):
        alphabet += plain.get("overrideSpecial") or "!@#$%&*()-_=+[]{}<>:?"
    result = "".join(secrets.choice(alphabet or string.ascii_letters) for _ in range(length))
    return {"result": secret(result), "bcryptHash": secret("$2a$10$" + secrets.token_hex(26))}


# -- tls (real keys and certificates, made by openssl) ----------------------------------------


def _openssl(*args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            ["openssl", *args], input=stdin, capture_output=True, text=True, check=True
        )
    except FileNotFoundError:
        raise CliError("the stand-in needs the openssl command (apt-get install openssl)") from None
    except subprocess.CalledProcessError as exc:
        raise StepError(f"openssl {args[0]} failed: {exc.stderr.strip()}") from None
    return done.stdout


def _private_key(plain: dict, inputs: dict) -> tuple[str, dict]:
    algorithm = (plain.get("algorithm") or "RSA").upper()
    if algorithm == "RSA":
        bits = str(int(plain.get("rsaBits") or 2048))
        key = _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}")
    elif algorithm == "ECDSA":
        curve = {"P224": "P-224", "P256": "P-256", "P384": "P-384", "P521": "P-521"}
        name = curve[(plain.get("ecdsaCurve") or "P224").upper()]
        key = _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{name}")
    else:
        key = _openssl("genpkey", "-algorithm", "ED25519")
    public = _openssl("pkey", "-pubout", stdin=key)
    der = base64.b64decode("".join(public.strip().splitlines()[1:-1]))
    outputs = {
        **inputs,
        "privateKeyPem": secret(key),
        "privateKeyPemPkcs8": secret(key),
        "privateKeyOpenssh": secret(""),
        "publicKeyPem": public,
        "publicKeyOpenssh": "",
        "publicKeyFingerprintMd5": hashlib.md5(der).hexdigest(),
        "publicKeyFingerprintSha256": base64.b64encode(hashlib.sha256(der).digest()).decode(),
    }
    return hashlib.sha1(der).hexdigest(), outputs


_KEY_USAGE = {
    "digital_signature": "digitalSignature", "key_encipherment": "keyEncipherment",
    "cert_signing": "keyCertSign", "crl_signing": "cRLSign",
}
_EXTENDED_USAGE = {"server_auth": "serverAuth", "client_auth": "clientAuth"}


def _self_signed_cert(plain: dict, inputs: dict) -> tuple[str, dict]:
    subject = plain.get("subject") or {}
    hours = int(plain.get("validityPeriodHours") or 24)
    alt_names = [f"DNS:{n}" for n in plain.get("dnsNames") or []]
    alt_names += [f"IP:{ip}" for ip in plain.get("ipAddresses") or []]
    uses = plain.get("allowedUses") or []
    serial = secrets.randbits(63)
    is_ca = bool(plain.get("isCaCertificate"))
    args = [
        "req", "-x509", "-new", "-key", "/dev/stdin", "-sha256",
        "-days", str(max(1, math.ceil(hours / 24))),
        "-set_serial", str(serial),
        "-subj", f"/CN={subject.get('commonName') or 'standin'}",
        "-addext", "basicConstraints=critical,CA:" + ("TRUE" if is_ca else "FALSE"),
    ]
    if alt_names:
        args += ["-addext", "subjectAltName=" + ",".join(alt_names)]
    if any(u in _KEY_USAGE for u in uses):
        args += ["-addext", "keyUsage=" + ",".join(_KEY_USAGE[u] for u in uses if u in _KEY_USAGE)]
    if any(u in _EXTENDED_USAGE for u in uses):
        extended = ",".join(_EXTENDED_USAGE[u] for u in uses if u in _EXTENDED_USAGE)
        args += ["-addext", "extendedKeyUsage=" + extended]
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "openssl.cnf"
        config.write_text("[req]\ndistinguished_name=dn\n[dn]\n")
        cert = _openssl(*args, "-config", str(config), stdin=plain["privateKeyPem"])
    start = datetime.now(timezone.utc)
    outputs = {
        **inputs,
        "certPem": cert,
        "validityStartTime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validityEndTime": (start + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "readyForRenewal": False,
    }
    return str(serial), outputs
