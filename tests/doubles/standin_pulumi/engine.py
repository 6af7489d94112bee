"""The stand-in's engine: `up`, `refresh` and `destroy` against a locked stack.

For `up` it runs the SDK's inline program the way the real CLI does: it serves a
`ResourceMonitor` and an `Engine` on a local port, calls `LanguageRuntime.Run` at `--client`
with that address, and turns each `RegisterResource` into a step (create, same, update, replace)
against the simulated cloud, writing the state after every step and streaming engine events
(`--event-log`: a gRPC `Events` stream for `tcp://…`, else a file of JSON lines).
"""

from __future__ import annotations

import json
import queue
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime.proto import (
    engine_pb2,
    engine_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    language_pb2,
    language_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
)

from .backend import CliError, Workspace, mask, now_text, secret
from .cloud import IN_PLACE, INSTANCE, Cloud, StepError

STACK_TYPE = "pulumi:pulumi:Stack"
SEVERITIES = {0: "debug", 1: "info", 2: "warning", 3: "error"}


class Events:
    """Engine events to the SDK: a gRPC stream (CLI > 3.205) or a JSON-lines file (older)."""

    def __init__(self, target: str | None):
        self.sequence = 0
        self.lock = threading.Lock()
        self.file = None
        self.queue: queue.Queue | None = None
        if target and target.startswith("tcp://"):
            self.channel = grpc.insecure_channel(target[len("tcp://"):])
            stub = events_pb2_grpc.EventsStub(self.channel)
            self.queue = queue.Queue()
            requests = iter(self.queue.get, None)
            self.sender = threading.Thread(target=stub.StreamEvents, args=(requests,), daemon=True)
            self.sender.start()
        elif target:
            self.file = open(target, "a", encoding="utf-8")  # noqa: SIM115 closed in close()

    def emit(self, kind: str, body: dict) -> None:
        with self.lock:
            self.sequence += 1
            event = {"sequence": self.sequence, "timestamp": int(time.time()), kind: body}
            line = json.dumps(event)
            if self.queue is not None:
                self.queue.put(events_pb2.EventRequest(event=line))
            elif self.file is not None:
                self.file.write(line + "\n")
                self.file.flush()

    def close(self) -> None:
        self.emit("cancelEvent", {})
        if self.queue is not None:
            self.queue.put(None)
            self.sender.join(10)
            self.channel.close()
        if self.file is not None:
            self.file.close()


def state_metadata(resource: dict | None) -> dict | None:
    """A resource as events show it: secrets masked, like the real engine."""
    if resource is None:
        return None
    return {
        "type": resource["type"], "urn": resource["urn"], "custom": resource.get("custom", False),
        "id": resource.get("id", ""), "parent": resource.get("parent", ""),
        "provider": resource.get("provider", ""),
        "inputs": mask(resource.get("inputs") or {}),
        "outputs": mask(resource.get("outputs") or {}),
    }


class Operation:
    """The state of one stack while an operation changes it, saved after every step."""

    def __init__(self, ws: Workspace, stack: str, kind: str, events: Events, env: dict[str, str]):
        self.ws = ws
        self.backend = ws.backend
        self.stack = stack
        self.kind = kind
        self.events = events
        self.env = env
        self.cloud = Cloud(self.backend.root, env)
        latest = self.backend.load(stack)
        self.resources: list[dict] = latest["resources"]
        self.pending: list[dict] = latest["pending_operations"]
        self.changes: Counter[str] = Counter()
        self.started = time.time()
        self.start_text = now_text()
        self.failure: str | None = None
        self.lock = threading.RLock()
        self.dry_run = False  # a preview: nothing reaches the cloud or the state

    def find(self, urn: str) -> dict | None:
        return next((r for r in self.resources if r["urn"] == urn), None)

    def put(self, resource: dict) -> None:
        for index, existing in enumerate(self.resources):
            if existing["urn"] == resource["urn"]:
                self.resources[index] = resource
                break
        else:
            self.resources.append(resource)
        self.save()

    def drop(self, urn: str) -> None:
        self.resources = [r for r in self.resources if r["urn"] != urn]
        self.save()

    def save(self) -> None:
        if self.dry_run:
            return
        deployment = {"resources": self.resources, "pending_operations": self.pending}
        self.backend.save(self.stack, deployment)

    def step(self, op: str, urn: str, type_: str, old: dict | None, new: dict | None) -> dict:
        return {
            "op": op, "urn": urn, "type": type_, "provider": (new or old or {}).get("provider", ""),
            "old": state_metadata(old), "new": state_metadata(new),
        }

    def pre(self, metadata: dict) -> None:
        self.events.emit("resourcePreEvent", {"metadata": metadata, "planning": self.dry_run})

    def done(self, metadata: dict) -> None:
        self.events.emit("resOutputsEvent", {"metadata": metadata, "planning": self.dry_run})
        if metadata["op"] != "same":
            print(f" {metadata['op']:>8}  {metadata['type']}  {metadata['urn'].split('::')[-1]}")

    def fail(self, metadata: dict, message: str) -> None:
        name = metadata["urn"].split("::")[-1]
        text = f"  {metadata['type']} ({name}):\n    error: {message}"
        self.diagnostic("error", f"{message}\n", metadata["urn"])
        self.events.emit("resOpFailedEvent", {"metadata": metadata, "status": 1, "steps": 0})
        print(text)
        self.failure = self.failure or message

    def diagnostic(self, severity: str, message: str, urn: str = "") -> None:
        body = {"message": message, "color": "never", "severity": severity}
        if urn:
            body["urn"] = urn
        self.events.emit("diagnosticEvent", body)

    def refresh_resources(self) -> None:
        """A refresh step per resource of the state, then only pending creates kept (see
        `refresh`). A compute instance's `state` input follows the cloud's, as the bridge's
        `Read` returns inputs extracted from the refreshed state."""
        for resource in list(self.resources):
            if not resource.get("custom") or resource["type"].startswith("pulumi:providers:"):
                continue
            metadata = self.step("refresh", resource["urn"], resource["type"], resource, None)
            self.pre(metadata)
            try:
                found = self.cloud.read(
                    resource["type"], resource.get("id", ""), resource.get("outputs") or {}
                )
            except StepError as exc:
                self.fail(metadata, str(exc))
                continue
            if found is None:
                self.drop(resource["urn"])
                self.changes["delete"] += 1
            elif found != (resource.get("id"), resource.get("outputs")):
                object_id, outputs = found
                inputs = dict(resource.get("inputs") or {})
                if resource["type"] == INSTANCE and "state" in inputs and outputs.get("state"):
                    inputs["state"] = outputs["state"]
                self.put({**resource, "id": object_id, "inputs": inputs, "outputs": outputs})
                self.changes["update"] += 1
            else:
                self.changes["same"] += 1
            self.done({**metadata, "new": state_metadata(self.find(resource["urn"]))})
        self.pending = [p for p in self.pending if p["type"] == "creating"]
        self.save()

    def finish(self, lock: Path) -> None:
        """Record the operation, close the event stream and release the lock."""
        result = "failed" if self.failure else "succeeded"
        self.save()
        self.backend.record(self.stack, {
            "kind": self.kind, "startTime": self.start_text, "endTime": now_text(),
            "message": "", "environment": {"exec.kind": "auto.inline"}, "config": {},
            "result": result, "resourceChanges": dict(self.changes),
        })
        duration = int(time.time() - self.started)
        self.events.emit("summaryEvent", {
            "maybeCorrupt": False, "durationSeconds": duration,
            "resourceChanges": dict(self.changes), "PolicyPacks": {},
        })
        self.events.close()
        lock.unlink(missing_ok=True)
        print("Resources:")
        for op, count in sorted(self.changes.items()):
            print(f"    {count} {op}")
        print(f"Duration: {duration}s")


# -- up ---------------------------------------------------------------------------------------


class Deployment(Operation, resource_pb2_grpc.ResourceMonitorServicer,
                 engine_pb2_grpc.EngineServicer):
    """`up`: the ResourceMonitor and Engine the SDK's program talks to."""

    def __init__(self, ws: Workspace, stack: str, events: Events, env: dict[str, str],
                 dry_run: bool = False):
        super().__init__(ws, stack, "update", events, env)
        self.dry_run = dry_run
        self.old = {r["urn"]: r for r in self.resources}
        self.registered: set[str] = set()
        self.root_urn = ""

    def urn(self, parent: str, type_: str, name: str) -> str:
        if parent:
            parent_type = parent.split("::")[2]
            if parent_type != STACK_TYPE:
                type_ = f"{parent_type}${type_}"
        return f"urn:pulumi:{self.stack}::{self.ws.project}::{type_}::{name}"

    def run(self, client: str) -> None:
        """Serve the monitor, run the program at `client`, then delete what it no longer has."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        resource_pb2_grpc.add_ResourceMonitorServicer_to_server(self, server)
        engine_pb2_grpc.add_EngineServicer_to_server(self, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        config = self.ws.config_values(self.stack)
        request = language_pb2.RunRequest(
            project=self.ws.project, stack=self.stack, pwd=str(self.ws.cwd), program=".",
            args=[address], config={k: v for k, (v, _) in config.items()},
            configSecretKeys=[k for k, (_, is_secret) in config.items() if is_secret],
            dryRun=self.dry_run, parallel=16, monitor_address=address,
            organization="organization",
        )
        try:
            with grpc.insecure_channel(client) as channel:
                error = language_pb2_grpc.LanguageRuntimeStub(channel).Run(request).error
        except grpc.RpcError as exc:  # after a failed step the SDK may give up on Run itself
            error = f"the program failed: {exc.details()}"
        finally:
            server.stop(0)
        if error and not self.failure:
            self.diagnostic("error", error + "\n")
            print(f"    error: {error}")
            self.failure = error
        if not self.failure:
            self.delete_unregistered()

    def delete_unregistered(self) -> None:
        for resource in reversed(list(self.resources)):
            if resource["urn"] in self.registered:
                continue
            metadata = self.step("delete", resource["urn"], resource["type"], resource, None)
            self.pre(metadata)
            if resource.get("custom") and not self.dry_run:
                self.cloud.delete(resource["type"], resource.get("id", ""))
            self.drop(resource["urn"])
            self.changes["delete"] += 1
            self.done(metadata)

    # -- Engine -------------------------------------------------------------------------------

    def Log(self, request, context):
        if self.failure:
            return empty_pb2.Empty()  # the real engine has stopped listening by now
        severity = SEVERITIES.get(request.severity, "info")
        self.diagnostic(severity, request.message + "\n", request.urn)
        if severity != "debug":
            print(f"    {severity}: {request.message}")
        return empty_pb2.Empty()

    def GetRootResource(self, request, context):
        return engine_pb2.GetRootResourceResponse(urn=self.root_urn)

    def SetRootResource(self, request, context):
        self.root_urn = request.urn
        return engine_pb2.SetRootResourceResponse()

    # -- ResourceMonitor ----------------------------------------------------------------------

    def GetDeploymentInfo(self, request, context):
        return resource_pb2.DeploymentInfo(
            project=self.ws.project, stack=self.stack, organization="organization",
            supportedFeatures=[resource_pb2.RESOURCE_MONITOR_FEATURE_SECRETS],
        )

    def SupportsFeature(self, request, context):
        return resource_pb2.SupportsFeatureResponse(hasSupport=request.id == "secrets")

    def RegisterPackage(self, request, context):
        return resource_pb2.RegisterPackageResponse(ref=str(uuid.uuid4()))

    def SignalAndWaitForShutdown(self, request, context):
        return empty_pb2.Empty()

    def RegisterResourceOutputs(self, request, context):
        with self.lock:
            resource = self.find(request.urn)
            if resource is not None:
                self.put({**resource, "outputs": _to_dict(request.outputs)})
        return empty_pb2.Empty()

    def Invoke(self, request, context):
        with self.lock:
            if self.failure:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the update failed")
            try:
                self.provider(request.tok.split(":")[0], request.version)
                result = self.cloud.invoke(request.tok, _to_dict(request.args))
            except StepError as exc:
                self.diagnostic("error", f"{exc}\n")
                print(f"    error: {exc}")
                self.failure = self.failure or str(exc)
                context.abort(grpc.StatusCode.UNAVAILABLE, "the update failed")
        return resource_pb2.ResourceInvokeResponse(**{"return": _to_struct(result)})

    def RegisterResource(self, request, context):
        with self.lock:
            if self.failure:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the update failed")
            urn = self.urn(request.parent, request.type, request.name)
            self.registered.add(urn)
            new = {
                "urn": urn, "custom": request.custom, "type": request.type,
                "parent": request.parent, "inputs": _to_dict(request.object),
                "dependencies": list(request.dependencies),
            }
            try:
                if urn in self.old and request.ignoreChanges:
                    new["inputs"] = _ignore_changes(
                        new["inputs"], self.old[urn].get("inputs") or {}, request.ignoreChanges)
                if request.custom:
                    package = request.type.split(":")[0]
                    new["provider"] = request.provider or self.provider(package, request.version)
                resource = self.apply(new, list(request.additionalSecretOutputs),
                                      delete_first=request.deleteBeforeReplace)
            except StepError as exc:
                self.fail(self.step("create", urn, request.type, self.old.get(urn), new), str(exc))
                context.abort(grpc.StatusCode.UNAVAILABLE, "the update failed")
        return resource_pb2.RegisterResourceResponse(
            urn=urn, id=resource.get("id", ""), object=_to_struct(resource.get("outputs") or {})
        )

    # -- steps --------------------------------------------------------------------------------

    def apply(self, new: dict, secret_outputs: list[str], delete_first: bool = False) -> dict:
        old = self.old.get(new["urn"])
        op = _operation(old, new)
        metadata = self.step(op, new["urn"], new["type"], old, new)
        self.pre(metadata)
        if new["custom"] and op != "same":
            self.cloud.check_inputs(new["type"], new["inputs"])  # the provider's Check
        if self.dry_run and op != "same":
            # A preview: what is known now; the outputs the cloud would make stay unknown.
            new = {**new, "id": (old or {}).get("id", ""),
                   "outputs": {**((old or {}).get("outputs") or {}), **new["inputs"]}}
        elif op == "same":
            new = {**new, "id": old.get("id", ""), "outputs": old.get("outputs") or {}}
        elif not new["custom"]:
            new = {**new, "outputs": (old or {}).get("outputs") or {}}
        elif op == "update":
            outputs = self.cloud.update(
                new["type"], old["id"], old["inputs"], new["inputs"], old["outputs"]
            )
            new = {**new, "id": old["id"], "outputs": outputs}
        else:
            # A replacement creates the new one, then deletes the old, unless the program says
            # `delete_before_replace` (pkg/resource/deploy/step_generator.go: CreateBeforeDelete
            # by default, DeleteBeforeCreate when the resource option is set).
            if op == "replace" and delete_first:
                self.cloud.delete(old["type"], old.get("id", ""))
            new = self.create(new)
            if op == "replace" and not delete_first:
                self.cloud.delete(old["type"], old.get("id", ""))
        new["outputs"] = _mark_secrets(new.get("outputs") or {}, secret_outputs)
        self.put(new)
        self.changes[op] += 1
        self.done(self.step(op, new["urn"], new["type"], old, new))
        return new

    def create(self, new: dict) -> dict:
        """Create in the cloud, with a pending operation in the state while it runs."""
        pending = {"resource": dict(new), "type": "creating"}
        self.pending.append(pending)
        self.save()
        object_id, outputs = self.cloud.create(new["type"], new["inputs"], self.resources)
        if new["type"] == INSTANCE and self.env.get("STANDIN_UP_HANG"):
            print("hanging after creating the instance (STANDIN_UP_HANG)", flush=True)
            while True:
                time.sleep(3600)
        self.pending.remove(pending)
        return {**new, "id": object_id, "outputs": outputs}

    def provider(self, package: str, version: str) -> str:
        """The default provider for a package: the plugin must be installed (no downloads)."""
        name = "default_" + version.replace(".", "_") if version else "default"
        urn = self.urn("", f"pulumi:providers:{package}", name)
        existing = self.find(urn)
        if urn not in self.registered:
            self.registered.add(urn)
            _require_plugin(package, version, self.env)
            self.cloud.check(package)
            old = self.old.get(urn)
            new = {
                "urn": urn, "custom": True, "type": f"pulumi:providers:{package}",
                "inputs": {"version": version}, "outputs": {"version": version},
                "id": old["id"] if old else str(uuid.uuid4()),
            }
            op = "same" if old else "create"
            self.pre(self.step(op, urn, new["type"], old, new))
            self.put(new)
            self.changes[op] += 1
            self.done(self.step(op, urn, new["type"], old, new))
            existing = new
        return f"{urn}::{existing['id']}"


def _ignore_changes(inputs: dict, old_inputs: dict, paths) -> dict:
    """`ignoreChanges`: each named input takes its old value (or stays unset if it had none),
    so the diff sees no change there and no replacement follows (pulumi/pulumi
    pkg/resource/deploy/step_generator.go `processIgnoreChanges`, applied only to a resource
    the state already holds). Property paths deeper than a top-level name are refused: this
    stand-in does not model them."""
    kept = dict(inputs)
    for path in paths:
        if not path.isidentifier():
            raise StepError(f"the stand-in supports ignoreChanges on top-level inputs only: {path}")
        if path in old_inputs:
            kept[path] = old_inputs[path]
        else:
            kept.pop(path, None)
    return kept


def _operation(old: dict | None, new: dict) -> str:
    if old is None:
        return "create"
    if old.get("inputs") == new["inputs"]:
        return "same"
    changed = {
        key for key in set(old.get("inputs") or {}) | set(new["inputs"])
        if (old.get("inputs") or {}).get(key) != new["inputs"].get(key)
    }
    return "update" if changed <= IN_PLACE.get(new["type"], set()) else "replace"


def _mark_secrets(outputs: dict, keys: list[str]) -> dict:
    from .backend import is_secret

    return {k: secret(v) if k in keys and not is_secret(v) else v for k, v in outputs.items()}


def _require_plugin(package: str, version: str, env: dict[str, str]) -> None:
    if package == "pulumi":
        return
    home = Path(env.get("PULUMI_HOME") or Path.home() / ".pulumi")
    if (home / "plugins" / f"resource-{package}-v{version}").is_dir():
        return
    if shutil.which(f"pulumi-resource-{package}", path=env.get("PATH")):
        return
    raise StepError(
        f"could not load plugin for {package} provider 'default_{version.replace('.', '_')}': "
        f"no resource plugin 'pulumi-resource-{package}' found in the workspace at version "
        f"v{version} or on your $PATH, install the plugin using "
        f"`pulumi plugin install resource {package} v{version}`"
    )


def _to_dict(struct: struct_pb2.Struct) -> dict:
    return json_format.MessageToDict(struct)


def _to_struct(value: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


# -- the commands -----------------------------------------------------------------------------


def up(ws: Workspace, stack: str, options: dict, env: dict[str, str]) -> int:
    ws.require_passphrase()
    ws.backend.require(stack)
    lock = ws.backend.lock(stack)
    events = Events(options.get("--event-log"))
    deployment = Deployment(ws, stack, events, env)
    events.emit("preludeEvent", {"config": {}})
    print(f"Updating ({stack}):")
    if options.get("--refresh"):  # the engine refreshes first (deployment_executor.go)
        deployment.refresh_resources()
        deployment.old = {r["urn"]: r for r in deployment.resources}
    elif deployment.pending:
        # The real CLI warns and carries on: a pending create may be an orphan in the cloud.
        urns = ", ".join(p["resource"]["urn"] for p in deployment.pending)
        message = (
            f"Attempting to deploy or update resources with {len(deployment.pending)} pending "
            f"operations from previous deployment: {urns}"
        )
        deployment.diagnostic("warning", message + "\n")
        print(f"    warning: {message}")
    try:
        if not options.get("--client"):
            raise CliError("the stand-in runs only inline programs (--client)")
        deployment.run(options["--client"])
    finally:
        deployment.finish(lock)
    if deployment.failure:
        print("error: update failed", file=sys.stderr)
        return 255
    return 0


def preview(ws: Workspace, stack: str, options: dict, env: dict[str, str]) -> int:
    """`pulumi preview`: the program runs as for `up` (`dryRun` set in its RunRequest), every
    step is planned and the provider checks every input, functions such as `getTemplate` are
    invoked for real, and nothing is created or saved: no lock, no history."""
    ws.require_passphrase()
    ws.backend.require(stack)
    events = Events(options.get("--event-log"))
    deployment = Deployment(ws, stack, events, env, dry_run=True)
    events.emit("preludeEvent", {"config": {}})
    print(f"Previewing update ({stack}):")
    try:
        if not options.get("--client"):
            raise CliError("the stand-in runs only inline programs (--client)")
        deployment.run(options["--client"])
    finally:
        events.emit("summaryEvent", {
            "maybeCorrupt": False, "durationSeconds": int(time.time() - deployment.started),
            "resourceChanges": dict(deployment.changes), "PolicyPacks": {},
        })
        events.close()
    print("Resources:")
    for op, count in sorted(deployment.changes.items()):
        print(f"    {count} to {op}")
    if deployment.failure:
        print("error: preview failed", file=sys.stderr)
        return 255
    return 0


def refresh(ws: Workspace, stack: str, options: dict, env: dict[str, str]) -> int:
    """`pulumi refresh`, as pulumi/pulumi's pkg/cmd/pulumi/operations/refresh.go and the engine
    run it: first the state edits the flags ask for, saved before the refresh starts:
    `--import-pending-creates URN ID ...` (pairs; each matching pending create becomes a pending
    `importing` operation with that ID), then `--clear-pending-creates` (the remaining pending
    creates are dropped). Then a refresh step per resource of the state
    (pkg/resource/deploy/deployment_executor.go `refresh`: `prev.Resources` only); at the end
    only pending creates are carried into the new state (pkg/backend/journal.go
    `GenerateDeployment`), so a pending import is dropped, not turned into a resource.
    A resource with no outputs is read as an import (pulumi-terraform-bridge
    pkg/tfbridge/provider.go `Read`: empty state runs the Terraform importer), which for
    Exoscale's zoned resources needs the ID `<ID>@<ZONE>` (see `Cloud.read`).
    """
    ws.require_passphrase()
    lock = ws.backend.lock(stack)
    events = Events(options.get("--event-log"))
    operation = Operation(ws, stack, "refresh", events, env)
    events.emit("preludeEvent", {"config": {}})
    try:
        _edit_pending_creates(operation, options)
        operation.refresh_resources()
    finally:
        operation.finish(lock)
    if operation.failure:
        print("error: refresh failed", file=sys.stderr)
        return 255
    return 0


def _edit_pending_creates(operation: Operation, options: dict) -> None:
    """The state edits refresh.go makes before it refreshes (`pendingCreatesToImports`, then
    `filterMapPendingCreates` for --clear-pending-creates), saved at once."""
    pairs = options.get("--import-pending-creates") or []
    if len(pairs) % 2:
        raise CliError("each URN must be followed by an ID: found an odd number of entries")
    imports = dict(zip(pairs[::2], pairs[1::2], strict=True))
    edited = []
    for op in operation.pending:
        urn = op["resource"]["urn"]
        if op["type"] == "creating" and urn in imports:
            op = {"resource": {**op["resource"], "id": imports.pop(urn)}, "type": "importing"}
        elif op["type"] == "creating" and options.get("--clear-pending-creates"):
            continue
        edited.append(op)
    for urn in imports:
        print(f'warning: "{urn}" did not correspond to a pending create', file=sys.stderr)
    operation.pending = edited
    operation.save()


def destroy(ws: Workspace, stack: str, options: dict, env: dict[str, str]) -> int:
    ws.require_passphrase()
    lock = ws.backend.lock(stack)
    events = Events(options.get("--event-log"))
    operation = Operation(ws, stack, "destroy", events, env)
    events.emit("preludeEvent", {"config": {}})
    try:
        for resource in reversed(list(operation.resources)):
            metadata = operation.step("delete", resource["urn"], resource["type"], resource, None)
            operation.pre(metadata)
            if resource.get("custom"):
                operation.cloud.delete(resource["type"], resource.get("id", ""))
            operation.drop(resource["urn"])
            operation.changes["delete"] += 1
            operation.done(metadata)
    finally:
        operation.finish(lock)
    return 0
