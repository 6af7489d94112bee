"""A stand-in of the Exoscale API v2 operations `ollama-exoscale bake` uses, on the simulated
cloud of the stand-in Pulumi CLI (tests/doubles/standin_pulumi/cloud.py: one JSON file).

Primary source: the API's OpenAPI document the official client ships and builds itself from,
`exoscale/openapi.json` in the `exoscale` PyPI package (0.16.4; `exoscale/api/v2.py` loads it
as `Path(__file__).parent.parent / "openapi.json"`). The operations, by operationId:
- `get-instance` GET /instance/{id}; `stop-instance` PUT /instance/{id}:stop;
  `start-instance` PUT /instance/{id}:start (body: optional `rescue-profile`);
- `create-snapshot` POST /instance/{id}:create-snapshot; `get-snapshot` GET /snapshot/{id};
- `promote-snapshot-to-template` POST /snapshot/{id}:promote (body: `name` required, 1–255
  characters; `default-user`, `description`, `ssh-key-enabled`, `password-enabled`);
- `list-templates` GET /template (query `visibility`: private|public); `get-template`
  GET /template/{id}; `delete-template` DELETE /template/{id}; `copy-template`
  POST /template/{id} (body: `target-zone` required);
- `get-operation` GET /operation/{id}.
Asynchronous ones answer an `operation` ({id, state, reference {id, link, command}}) whose
state is `pending` for `pending_polls` reads, then `success`. Shapes are the document's
`components/schemas` (`instance`, `snapshot`, `template`, `operation`), trimmed to the fields
set here.

What it refuses: a request not signed as `exoscale_auth.ExoscaleV2Auth` signs it (EXO2-HMAC-
SHA256 over method and path, body, signed query values, expiry) with a known key and secret,
or expired: 403, which the client raises as ExoscaleAPIAuthException; an unknown ID: 404; a
body the document's schema refuses (a missing `name`, a zone outside its enum): 400; stopping
an instance that is not running: 400 "Only running instances can be stopped" (the API's
message as the Exoscale provider meets it, /work/shared/NOTES.md; the document states no
precondition, the status code is ours); promoting a snapshot that is not `ready`: 400. The
document does not forbid a snapshot of a running instance, so neither does this: bake stops
the instance first for a consistent disk.

A snapshot copies the instance's simulated disk (tests/doubles/standin_pulumi/server.py keeps
what its install stages did there); a template promoted from it keeps that copy, and an
instance the stand-in cloud creates from the template starts on it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tests.doubles.standin_pulumi.backend import now_text
from tests.doubles.standin_pulumi.cloud import Cloud, stop_process

SPEC = "exoscale/openapi.json"  # in the installed `exoscale` package
ZONES = ("at-vie-1", "at-vie-2", "bg-sof-1", "ch-dk-2", "ch-gva-2", "de-fra-1", "de-muc-1",
         "hr-zag-1")  # the document's `zone-name` enum (servers' `zone` variable)
_AUTH = re.compile(r"^EXO2-HMAC-SHA256 (?P<pragmas>.+)$")
_ID = r"(?P<id>[0-9a-fA-F-]{36})"
ROUTES = [  # (verb, path pattern under /v2, handler name)
    ("GET", rf"/instance/{_ID}", "get_instance"),
    ("PUT", rf"/instance/{_ID}:stop", "stop_instance"),
    ("PUT", rf"/instance/{_ID}:start", "start_instance"),
    ("POST", rf"/instance/{_ID}:create-snapshot", "create_snapshot"),
    ("GET", rf"/snapshot/{_ID}", "get_snapshot"),
    ("POST", rf"/snapshot/{_ID}:promote", "promote_snapshot_to_template"),
    ("GET", r"/template", "list_templates"),
    ("GET", rf"/template/{_ID}", "get_template"),
    ("DELETE", rf"/template/{_ID}", "delete_template"),
    ("POST", rf"/template/{_ID}", "copy_template"),
    ("GET", rf"/operation/{_ID}", "get_operation"),
]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ExoscaleApi:
    """The stand-in, serving on 127.0.0.1 in a thread; `url` is what the client's `url=` takes."""

    def __init__(self, backend_root: Path, key: str, secret: str, zone: str = "at-vie-2",
                 pending_polls: int = 0):
        self.cloud = Cloud(backend_root, {})
        self.credentials = {key: secret}
        self.zone = zone
        self.pending_polls = pending_polls
        self.calls: list[str] = []  # operationIds served, in order (refused ones too)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                api.handle(self)

            do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v2"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ExoscaleApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the HTTP layer ----------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        parsed = urlparse(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        try:
            name, match = self._route(request.command, parsed.path)
            self.calls.append(name.replace("_", "-"))
            self._authenticate(request, parsed.path, parsed.query, body)
            payload = json.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise ApiError(400, "the body must be a JSON object")
            query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
            status, answer = 200, getattr(self, name)(match.groupdict().get("id"), payload, query)
        except ApiError as exc:
            status, answer = exc.status, {"message": str(exc)}
        except ValueError:
            status, answer = 400, {"message": "the body is not JSON"}
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _route(self, verb: str, path: str) -> tuple[str, re.Match]:
        if not path.startswith("/v2/"):
            raise ApiError(404, f"no such path {path}")
        for route_verb, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path[3:])
            if match and route_verb == verb:
                return name, match
        raise ApiError(404, f"no operation for {verb} {path}")

    def _authenticate(self, request: BaseHTTPRequestHandler, path: str, query: str,
                      body: bytes) -> None:
        """ExoscaleV2Auth's signature (requests-exoscale-auth, `exoscale_auth.py`), checked."""
        found = _AUTH.match(request.headers.get("Authorization") or "")
        if not found:
            raise ApiError(403, "missing or malformed Authorization header")
        pragmas = dict(p.split("=", 1) for p in found["pragmas"].split(",") if "=" in p)
        secret = self.credentials.get(pragmas.get("credential", ""))
        expires = pragmas.get("expires", "")
        if secret is None or not expires.isdigit() or int(expires) < time.time():
            raise ApiError(403, "invalid credentials or expired signature")
        params = parse_qs(query)
        signed = [n for n in pragmas.get("signed-query-args", "").split(";") if n]
        values = "".join(params[n][0] for n in signed if len(params.get(n, ())) == 1)
        message = b"\n".join([f"{request.command} {path}".encode(), body, values.encode(), b"",
                              expires.encode()])
        expected = base64.b64encode(
            hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, pragmas.get("signature", "")):
            raise ApiError(403, "invalid request signature")

    # -- operations ----------------------------------------------------------------------------

    def _operation(self, data: dict, kind: str, reference: str) -> dict:
        operation_id = str(uuid.uuid4())
        data["operations"][operation_id] = {"pending": self.pending_polls, "kind": kind,
                                            "reference": reference}
        return _operation_shape(operation_id, data["operations"][operation_id])

    def get_operation(self, operation_id: str, body: dict, query: dict) -> dict:
        with self.cloud.objects() as data:
            found = data["operations"].get(operation_id)
            if found is None:
                raise ApiError(404, f"operation {operation_id} not found")
            shape = _operation_shape(operation_id, found)
            found["pending"] = max(0, found["pending"] - 1)
        return shape

    def _instance(self, data: dict, instance_id: str) -> dict:
        record = data["instances"].get(instance_id)
        if record is None:
            raise ApiError(404, f"instance {instance_id} not found")
        return record

    def get_instance(self, instance_id: str, body: dict, query: dict) -> dict:
        with self.cloud.objects() as data:
            record = self._instance(data, instance_id)
            template = self._template_of(data, record)
        return {
            "id": instance_id, "name": record.get("name"), "state": record.get("state"),
            "disk-size": record.get("diskSize"), "created-at": record.get("createdAt"),
            "labels": record.get("labels") or {}, "public-ip": record.get("publicIpAddress"),
            "instance-type": {"family": (record.get("type") or ".").split(".")[0],
                              "size": (record.get("type") or ".").split(".")[1]},
            "template": template,
        }

    def _template_of(self, data: dict, record: dict) -> dict:
        """The instance's template: a private one of ours, or the public one the stand-in
        cloud's getTemplate names (Ubuntu's default user, `ubuntu`)."""
        template_id = record.get("templateId") or ""
        if template_id in data["templates"]:
            return _template_shape(template_id, data["templates"][template_id])
        return {"id": template_id, "name": "Linux Ubuntu 24.04 LTS 64-bit",
                "default-user": "ubuntu", "visibility": "public", "family": "ubuntu"}

    def stop_instance(self, instance_id: str, body: dict, query: dict) -> dict:
        with self.cloud.objects() as data:
            record = self._instance(data, instance_id)
            if (record.get("state") or "running") != "running":
                raise ApiError(400, "Only running instances can be stopped")
            pid = record.get("pid")
            record["state"], record["pid"] = "stopped", None
            operation = self._operation(data, "instance", instance_id)
        if pid:
            stop_process(pid)  # the machine shuts down: its server writes its disk and ends
        return operation

    def start_instance(self, instance_id: str, body: dict, query: dict) -> dict:
        profile = body.get("rescue-profile")
        if profile is not None and profile not in ("netboot", "netboot-efi"):
            raise ApiError(400, f"rescue-profile {profile!r} is not one of netboot, netboot-efi")
        with self.cloud.objects() as data:
            record = self._instance(data, instance_id)
            if record.get("state") == "stopped":
                record["state"] = "running"
                record["pid"] = self.cloud.boot(instance_id, record)
            return self._operation(data, "instance", instance_id)

    def create_snapshot(self, instance_id: str, body: dict, query: dict) -> dict:
        snapshot_id = str(uuid.uuid4())
        with self.cloud.objects() as data:
            record = self._instance(data, instance_id)
            disk = self.cloud.files / f"snapshot-{snapshot_id}"
            shutil.copytree(record["disk"], disk, symlinks=True,  # boot.json: the cloud's
                            ignore=lambda folder, names: ["boot.json"] * (folder == record["disk"]))
            data["snapshots"][snapshot_id] = {
                "name": f"{record.get('name')}-{now_text()}", "created-at": now_text(),
                "state": "ready", "instance": instance_id, "zone": record.get("zone"),
                "size": record.get("diskSize"), "disk": str(disk),
            }
            return self._operation(data, "snapshot", snapshot_id)

    def get_snapshot(self, snapshot_id: str, body: dict, query: dict) -> dict:
        with self.cloud.objects() as data:
            found = data["snapshots"].get(snapshot_id)
            if found is None:
                raise ApiError(404, f"snapshot {snapshot_id} not found")
            return {"id": snapshot_id, "name": found["name"], "created-at": found["created-at"],
                    "state": found["state"], "size": found["size"],
                    "instance": {"id": found["instance"]}}

    def promote_snapshot_to_template(self, snapshot_id: str, body: dict, query: dict) -> dict:
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 255:
            raise ApiError(400, "name: required, a string of 1 to 255 characters")
        user = body.get("default-user")
        if user is not None and (not isinstance(user, str) or not 1 <= len(user) <= 255):
            raise ApiError(400, "default-user: a string of 1 to 255 characters")
        with self.cloud.objects() as data:
            snapshot = data["snapshots"].get(snapshot_id)
            if snapshot is None:
                raise ApiError(404, f"snapshot {snapshot_id} not found")
            if snapshot["state"] != "ready":
                raise ApiError(400, f"snapshot {snapshot_id} is {snapshot['state']}, not ready")
            template_id = str(uuid.uuid4())
            data["templates"][template_id] = {
                "name": name, "description": body.get("description") or "",
                "default-user": user or "", "ssh-key-enabled": bool(body.get("ssh-key-enabled")),
                "password-enabled": bool(body.get("password-enabled")),
                "created-at": now_text(), "zones": [snapshot["zone"]], "size": snapshot["size"],
                "disk": snapshot["disk"], "snapshot": snapshot_id,
            }
            return self._operation(data, "template", template_id)

    def list_templates(self, _: str | None, body: dict, query: dict) -> dict:
        visibility = query.get("visibility", "public")
        if visibility not in ("public", "private"):
            raise ApiError(400, f"visibility {visibility!r} is not one of private, public")
        with self.cloud.objects() as data:
            templates = [] if visibility == "public" else [
                _template_shape(template_id, t) for template_id, t in data["templates"].items()
                if self.zone in t["zones"]]
        return {"templates": templates}

    def get_template(self, template_id: str, body: dict, query: dict) -> dict:
        with self.cloud.objects() as data:
            found = data["templates"].get(template_id)
            if found is None or self.zone not in found["zones"]:
                raise ApiError(404, f"template {template_id} not found")
            return _template_shape(template_id, found)

    def delete_template(self, template_id: str, body: dict, query: dict) -> dict:
        with self.cloud.objects() as data:
            found = data["templates"].get(template_id)
            if found is None or self.zone not in found["zones"]:
                raise ApiError(404, f"template {template_id} not found")
            found["zones"].remove(self.zone)
            if not found["zones"]:
                del data["templates"][template_id]
            return self._operation(data, "template", template_id)

    def copy_template(self, template_id: str, body: dict, query: dict) -> dict:
        target = body.get("target-zone")
        if target not in ZONES:
            raise ApiError(400, f"target-zone: expected one of {', '.join(ZONES)}")
        with self.cloud.objects() as data:
            found = data["templates"].get(template_id)
            if found is None or self.zone not in found["zones"]:
                raise ApiError(404, f"template {template_id} not found")
            if target not in found["zones"]:
                found["zones"].append(target)
            return self._operation(data, "template", template_id)


def _operation_shape(operation_id: str, found: dict) -> dict:
    state = "pending" if found["pending"] > 0 else "success"
    reference = found["reference"]
    return {"id": operation_id, "state": state,
            "reference": {"id": reference, "link": f"/v2/{found['kind']}/{reference}",
                          "command": f"get-{found['kind']}"}}


def _template_shape(template_id: str, found: dict) -> dict:
    return {"id": template_id, "name": found["name"], "description": found["description"],
            "default-user": found["default-user"], "ssh-key-enabled": found["ssh-key-enabled"],
            "password-enabled": found["password-enabled"], "created-at": found["created-at"],
            "zones": list(found["zones"]), "size": found["size"], "visibility": "private",
            "family": "other"}
