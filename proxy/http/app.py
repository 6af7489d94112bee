"""The HTTP face of the proxy, routes only: create_app(config, lifecycle, forwarder).

An ASGI app (falcon.asgi) on each worker's event loop: responders only read the lifecycle's
in-memory snapshot and count demand in memory; what may block (the shared wrong-key table's
lock) goes to a thread, and a held request (`Prefer: wait`) is a coroutine, not a thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import falcon
import falcon.asgi

from proxy.config import Config
from proxy.http.lockout import FailureLimit
from proxy.http.metrics import HELD, Counting, MetricsResource
from proxy.http.paths import CanonicalPath
from proxy.lifecycle import gputime, schedule
from proxy.lifecycle.demand import Lifecycle, Snapshot, Ticket
from proxy.upstream.forward import Forwarder, UpstreamError
from proxy.upstream.session import normalise_model

SERVICE = "ollama-exoscale"
LOCAL_VERSION = "0.12.6"  # answered by /api/version before any upstream told us its own
# A 503 answer is computed once per snapshot and kept this long (Retry-After is whole
# seconds): a burst of demand while provisioning would otherwise redo it for every request.
ANSWER_TTL = 0.25
_PREFER_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
PREFER_DIGITS = 9  # a longer `wait=` is more than any PROXY_MAX_HOLD: read as "as long as allowed"


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, message: str, **extra: Any) -> dict[str, Any]:
    """Ollama's flat {"error": "..."} on /api/*, OpenAI's error object on /v1/*."""
    if is_openai(path):
        return {"error": {"message": message, "type": extra.pop("type", "error"), **extra}}
    return {"error": message, **extra}


def _iso(timestamp: float) -> str | None:
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


# Routes that can fill the disk, change or remove models, or the GPU server: admin keys only.
# Matched on the canonical path (proxy/http/paths.py); a trailing slash is the same route upstream.
ADMIN_ROUTES = re.compile(r"^/api/(pull|push|create|copy|delete)/?$|^/api/blobs(/|$)|^/admin(/|$)")


class Auth:
    """Bearer keys on every route but GET|HEAD / and the static /ui page, in constant time
    (installed only when keys are configured).

    Management routes (pull, push, create, copy, delete, blobs, /admin/*) need an admin key.
    Only an offered wrong key counts toward the per-address limit: a request without a key (a
    /ui tab left open) gets 401 and counts nothing, and a valid key is never answered 429.
    """

    def __init__(self, config: Config):
        # Counted across every worker: a client's connections land on any of them.
        self.failures = FailureLimit(config.state_dir / "auth-failures", config.auth_failures)
        self.keys = [(key.encode(), False) for key in config.api_keys]
        self.keys += [(key.encode(), True) for key in config.admin_keys]
        self.names = dict(config.key_names)
        self.log = logging.getLogger("ollama_exoscale.auth")

    async def process_request(self, req, resp) -> None:
        if _public(req):
            return
        scheme, _, offered = (req.get_header("Authorization") or "").partition(" ")
        offered_bytes = offered.strip().encode()
        match = None
        for key, admin in self.keys:  # no early exit: timing tells nothing about which key
            if hmac.compare_digest(key, offered_bytes) and scheme.lower() == "bearer":
                match = (key.decode(), admin)
        if match is None:
            await self._refuse(req, offered_bytes)
        key, admin = match
        req.context.key_name = self.names.get(key, "key")
        if not admin and ADMIN_ROUTES.match(req.path):
            self.log.warning("403 for %s %s: key %s is not an admin key", req.method, req.path,
                             req.context.key_name)
            raise falcon.HTTPForbidden(
                description=f"{req.path} changes the server or its models: it needs an admin "
                "key (PROXY_ADMIN_KEYS)"
            )

    async def _refuse(self, req, offered: bytes) -> None:
        """401 for a missing or wrong key; 429 once an address has offered too many wrong ones."""
        if offered:
            blocked_for = self.failures.blocked_for(req.remote_addr)
            if blocked_for:
                raise falcon.HTTPTooManyRequests(
                    description="too many requests with a wrong API key from this address; "
                    f"retry in {blocked_for} s",
                    retry_after=blocked_for,
                )
            await asyncio.to_thread(self.failures.record, req.remote_addr)  # a file lock
        self.log.warning("401 for %s %s from %s: %s", req.method, req.path, req.remote_addr,
                         "unknown key" if offered else "no bearer key")
        raise falcon.HTTPUnauthorized(
            description="a valid API key is required: send Authorization: Bearer <key>",
            challenges=["Bearer"],
        )


def _public(req) -> bool:
    return req.method in ("GET", "HEAD") and req.path in ("/", "/ui")


class Root:
    async def on_get(self, req, resp) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "Ollama is running"

    on_head = on_get


class Status:
    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_get(self, req, resp) -> None:
        resp.media = status_document(self.config, self.lifecycle)


def status_document(config: Config, lifecycle: Lifecycle) -> dict[str, Any]:
    """What /status shows: never provisions, never counts as demand, holds no secret."""
    snapshot = lifecycle.snapshot()
    now = time.time()
    idle_left = None
    if snapshot.phase == "ready":
        if snapshot.inflight:
            idle_left = config.idle_timeout
        else:
            idle_since = max(snapshot.last_activity, snapshot.ready_since)
            # Never above the timeout: a clock stepped back puts idle_since in the future.
            idle_left = min(max(0, round(config.idle_timeout - (now - idle_since))),
                            round(config.idle_timeout))
    cold = snapshot.cold_starts
    return {
        "service": SERVICE,
        "provisioning_status": snapshot.phase,
        "detail": snapshot.detail,
        "steps": [{**step, "at": _iso(step["at"])} for step in snapshot.steps],
        "instance_status": snapshot.endpoint.instance_status if snapshot.endpoint
        else snapshot.instance_status,
        "remote_url": snapshot.endpoint.url if snapshot.endpoint else None,
        "zone": config.zone,
        "instance_type": config.instance_type,
        "ollama_model": ",".join(config.models),
        "idle_timeout": config.idle_timeout,
        "idle_action": config.idle_action,
        "provider": config.provisioner,
        "phase_since": _iso(snapshot.phase_since),
        "last_activity": _iso(snapshot.last_activity),
        "in_flight": snapshot.inflight,
        "idle_seconds_left": idle_left,
        "last_error": snapshot.last_error,
        "failures": snapshot.failures,
        "retry_at": _iso(snapshot.retry_at) if snapshot.phase == "error" else None,
        "retry_after": None if snapshot.phase == "ready" else lifecycle.retry_after(snapshot),
        # Unclamped, for a person (Retry-After stops at 60 s for the OpenAI SDKs).
        "expected_wait": None if snapshot.phase == "ready"
        else max(1, round(lifecycle.expected_wait(snapshot))),
        "cold_starts": {
            "count": len(cold),
            "last": cold[-1] if cold else None,
            "median": lifecycle.typical_cold_start(snapshot) if cold else None,
        },
        "cold_start_timeline": {
            "last": snapshot.timelines[-1] if snapshot.timelines else None,
            "median": median_timeline(snapshot.timelines),
        },
        "cold_start_estimate": lifecycle.cold_start_estimate(snapshot),
        "upstream_version": snapshot.upstream_version,
        "store_error": lifecycle.store_error,
        "reconciler": snapshot.reconciler,
        "gpu": gpu_usage(config, lifecycle, snapshot, now),
        "warm_windows": warm_windows(config, now),
    }


def median_timeline(timelines: tuple[dict[str, Any], ...]) -> dict[str, float] | None:
    """Each stage's median over the recent cold starts that saw it (the proxy's stages)."""
    stages = [stage for timeline in timelines for stage, seconds in timeline.items()
              if isinstance(seconds, (int, float))]
    return {
        stage: round(statistics.median(t[stage] for t in timelines if stage in t), 3)
        for stage in dict.fromkeys(stages)
    } or None


def gpu_usage(config: Config, lifecycle: Lifecycle, snapshot: Snapshot, now: float
              ) -> dict[str, Any]:
    """GPU time of the current server, today and in all; the cost estimate; the limits."""
    record = snapshot.gpu_record
    seconds = {
        "instance_seconds": round(gputime.instance_seconds(record, now)),
        "today_seconds": round(gputime.today_seconds(record, now, config.tz)),
        "total_seconds": round(gputime.total_seconds(record, now)),
    }
    price = config.hourly_price
    cost = {
        key.replace("_seconds", "_cost"): round(value / 3600 * price, 2) if price else None
        for key, value in seconds.items()
    }
    return {
        **seconds, **cost,
        "hourly_price": price or None,
        "currency": config.currency,
        "instance_since": _iso(snapshot.instance_since),
        "max_instance_hours": config.max_instance_hours or None,
        "daily_gpu_hours": config.daily_gpu_hours or None,
        "budget_used_up": lifecycle.budget_used_up(snapshot),
    }


def warm_windows(config: Config, now: float) -> dict[str, Any]:
    local = datetime.fromtimestamp(now, config.tz)
    upcoming = schedule.next_start(config.warm_windows, local)
    return {
        "windows": [str(w) for w in config.warm_windows],
        "timezone": config.timezone,
        "warm_now": schedule.is_warm(config.warm_windows, local),
        "next_start": upcoming.isoformat(timespec="minutes") if upcoming else None,
    }


class Page:
    """/ui: one self-contained page; it holds no data, it fetches /status with the key."""

    def __init__(self):
        self.html = (Path(__file__).with_name("ui.html")).read_bytes()

    async def on_get(self, req, resp) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ["no-cache"]
        resp.data = self.html


class WarmUp:
    """POST /admin/up: start the GPU server now, as a request would (admin key)."""

    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_post(self, req, resp) -> None:
        if self.lifecycle.snapshot().phase != "ready":
            self.lifecycle.want()
        resp.status = falcon.HTTP_202
        resp.media = status_document(self.config, self.lifecycle)


class ShutDown:
    """POST /admin/down: remove the GPU server now, once its streams end (admin key)."""

    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_post(self, req, resp) -> None:
        self.lifecycle.down()
        resp.status = falcon.HTTP_202
        resp.media = status_document(self.config, self.lifecycle)


class Passive:
    """Routes clients poll to list models: answered here until the upstream is ready."""

    def __init__(self, config: Config, lifecycle: Lifecycle, forwarder: Forwarder, local):
        self.config = config
        self.lifecycle = lifecycle
        self.forwarder = forwarder
        self.local = local

    async def on_get(self, req, resp) -> None:
        ticket = self.lifecycle.admit(demand=False)
        if ticket is None:
            resp.media = self.local(self.config, self.lifecycle.snapshot())
            return
        await _forward(self.forwarder, self.lifecycle, self.config, req, resp, ticket)


def local_version(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    return {"version": snapshot.upstream_version or LOCAL_VERSION}


def local_tags(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    models = []
    for model in config.models:
        name = normalise_model(model)
        family = name.split("/")[-1].split(":")[0]
        models.append({
            "name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
            "digest": "", "details": {"format": "gguf", "family": family, "families": [family],
                                      "parameter_size": "", "quantization_level": ""},
        })
    return {"models": models}


def local_ps(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    return {"models": []}


def local_openai_models(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    data = [
        {"id": normalise_model(m), "object": "model", "created": 0, "owned_by": "library"}
        for m in config.models
    ]
    return {"object": "list", "data": data}


# What Ollama's routes (and browsers' CORS preflights) use; anything else is refused here.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Demand:
    """Every other Ollama route: forwarded when ready; otherwise wakes the GPU and says 503."""

    def __init__(self, config: Config, lifecycle: Lifecycle, forwarder: Forwarder):
        self.config = config
        self.lifecycle = lifecycle
        self.forwarder = forwarder
        # The last 503 answer in each shape (True: OpenAI's): (snapshot, until, Retry-After, body)
        self._answers: dict[bool, tuple] = {}

    async def __call__(self, req, resp, **_: Any) -> None:
        if req.method not in FORWARDED_METHODS:  # TRACE, CONNECT, junk: no GPU woken for them
            raise falcon.HTTPMethodNotAllowed(
                sorted(FORWARDED_METHODS), description=f"{req.method} is not an Ollama method"
            )
        limit = self.forwarder.body_limit(req.path, self.config.max_body, self.config.max_blob)
        if limit and (req.content_length or 0) > limit:  # refused before it wakes the GPU
            raise falcon.HTTPContentTooLarge(
                description=f"the request body ({req.content_length} bytes) is larger than the "
                f"limit of {limit} bytes (PROXY_MAX_BODY_MB, PROXY_MAX_BLOB_GB)"
            )
        ticket = self.lifecycle.admit()
        # Another worker may know it is ready; the store is read in a thread, off the loop.
        if ticket is None and await asyncio.to_thread(self.lifecycle.refresh):
            ticket = self.lifecycle.admit()
        if ticket is None:
            ticket = await self._hold(req, resp)
        if ticket is None:
            self._unavailable(req, resp)
            return
        await _forward(self.forwarder, self.lifecycle, self.config, req, resp, ticket)

    async def _hold(self, req, resp) -> Ticket | None:
        """RFC 7240 `Prefer: wait=N`: hold up to min(N, PROXY_MAX_HOLD) s while provisioning."""
        if self.config.max_hold <= 0:
            return None  # holding is off (the default)
        match = _PREFER_WAIT.search(req.get_header("Prefer") or "")
        digits = match.group(1) if match else "0"
        asked = int(digits) if len(digits) <= PREFER_DIGITS else self.config.max_hold
        seconds = min(asked, self.config.max_hold)
        if seconds <= 0 or self.lifecycle.budget_used_up() or not self.lifecycle.try_hold_slot():
            return None  # no server will come today: no point holding
        HELD.inc()
        try:
            await hold(self.lifecycle, seconds)
        finally:
            HELD.dec()
            self.lifecycle.release_hold_slot()
        resp.set_header("Preference-Applied", f"wait={seconds:g}")
        return self.lifecycle.admit()

    def _unavailable(self, req, resp) -> None:
        openai = is_openai(req.path)
        snapshot = self.lifecycle.snapshot()
        now = time.monotonic()
        kept = self._answers.get(openai)
        if kept is not None and kept[0] is snapshot and now < kept[1]:
            retry_after, text = kept[2], kept[3]
        else:
            retry_after, text = self._answer_for(snapshot, req.path)
            self._answers[openai] = (snapshot, now + ANSWER_TTL, retry_after, text)
        resp.status = falcon.HTTP_503
        resp.set_header("Retry-After", retry_after)
        resp.text = text
        resp.content_type = falcon.MEDIA_JSON

    def _answer_for(self, snapshot: Snapshot, path: str) -> tuple[str, str]:
        """(Retry-After, JSON body) of the 503 for this snapshot, in the shape of `path`'s
        clients (Ollama's or OpenAI's; the same for every path of one shape)."""
        retry_after = self.lifecycle.retry_after(snapshot)
        # A bring-up already under way runs on; the budget stops only new ones.
        budget = snapshot.phase in ("idle", "destroying") and \
            self.lifecycle.budget_used_up(snapshot)
        if budget:
            phase, message = "idle", budget_message(self.config, snapshot)
        else:
            phase, message = explain(snapshot, retry_after)
        if is_openai(path):
            code = "budget_exhausted" if budget else \
                "provisioning" if phase != "error" else "provisioning_failed"
            body = error_body(path, message, type="service_unavailable", code=code)
        else:
            body = error_body(path, message, provisioning=phase != "error" and not budget,
                              status=phase, retry_after=retry_after)
        return str(retry_after), json.dumps(body)


async def hold(lifecycle: Lifecycle, seconds: float) -> Snapshot:
    """Wait up to `seconds` for ready (or error), looking at the snapshot once a tick: a
    coroutine on the event loop, not a thread (the sync loop replaces the snapshot)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        snapshot = lifecycle.snapshot()
        left = deadline - loop.time()
        if snapshot.phase in ("ready", "error") or left <= 0 or lifecycle.closing:
            return snapshot
        await asyncio.sleep(min(left, lifecycle.config.tick))


def budget_message(config: Config, snapshot: Snapshot) -> str:
    used = gputime.today_seconds(snapshot.gpu_record, time.time(), config.tz) / 3600
    return (
        f"The daily GPU budget of {config.daily_gpu_hours:g} h is used up ({used:.1f} h today, "
        f"PROXY_DAILY_GPU_HOURS); the GPU server starts again for requests after midnight "
        f"({config.timezone})."
    )


def explain(snapshot: Snapshot, retry_after: int) -> tuple[str, str]:
    """(phase a client sees, a sentence for a person) while not ready."""
    phase = snapshot.phase
    if phase == "error" and snapshot.retry_at <= time.time():
        phase = "provisioning"  # this request starts the retry
    detail = f" ({snapshot.detail})" if snapshot.detail else ""
    if phase == "error":
        return phase, (
            f"Starting the GPU server failed: {snapshot.last_error}. It is tried again on a "
            f"request after {retry_after} s."
        )
    if phase == "starting":
        return phase, (
            f"The GPU server is up and Ollama is getting ready{detail}. Retry in {retry_after} s."
        )
    if phase == "destroying":
        reason = snapshot.removal_reason
        why = reason if reason and reason != "idle" else "after idle time"
        return phase, (
            f"The GPU server is being removed ({why}); it will start again for this "
            f"request. Retry in {retry_after} s."
        )
    if phase == "ready":  # became ready between the check and now
        return phase, "The GPU server is ready. Retry now."
    return "provisioning", f"The GPU server is starting{detail}. Retry in {retry_after} s."


async def _forward(forwarder, lifecycle, config, req, resp, ticket: Ticket) -> None:
    req.context.forwarded = True
    try:
        await forwarder.forward(
            req, resp, ticket.endpoint, lambda: lifecycle.finish(ticket),
            strip_authorization=config.auth_enabled,
            body_limit=forwarder.body_limit(req.path, config.max_body, config.max_blob),
            on_broken=lifecycle.want,  # the upstream may be gone: have it probed now
        )
    except UpstreamError as exc:
        if exc.status in (502, 504):
            lifecycle.want()  # unreachable or hung: have it probed now, not in 15 s
        status = "499 Client Closed Request" if exc.status == 499 else exc.status  # nginx's
        # A body that stalled was not read to its end: the connection cannot carry another.
        headers = {"Connection": "close"} if exc.status in (408, 413) else None
        raise falcon.HTTPError(
            falcon.code_to_http_status(status), description=str(exc), headers=headers
        ) from None


def serialize_error(req, resp, exc: falcon.HTTPError) -> None:
    """Every error as JSON with an `error` field, in the shape the route's clients parse."""
    message = exc.description or exc.title
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(error_body(req.path, message))


async def handle_unexpected(req, resp, exc, params, **_: Any) -> None:
    """A bug never crashes the worker nor leaks internals: a 500 with a JSON error."""
    if isinstance(exc, falcon.HTTPError):
        raise exc
    logging.getLogger("ollama_exoscale.app").exception("unhandled error on %s", req.path)
    raise falcon.HTTPInternalServerError(description="internal error in the proxy; see its logs")


def create_app(config: Config, lifecycle: Lifecycle, forwarder: Forwarder) -> falcon.asgi.App:
    # Without keys there is nothing to check: no middleware on the hot path for it.
    middleware = [Counting(), CanonicalPath()] + ([Auth(config)] if config.auth_enabled else [])
    app = falcon.asgi.App(middleware=middleware)
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route("/", Root())
    app.add_route("/status", Status(config, lifecycle))
    app.add_route("/metrics", MetricsResource(lifecycle, config.idle_timeout))
    app.add_route("/ui", Page())
    app.add_route("/admin/up", WarmUp(config, lifecycle))
    app.add_route("/admin/down", ShutDown(config, lifecycle))
    for path, local in (
        ("/api/version", local_version),
        ("/api/tags", local_tags),
        ("/api/ps", local_ps),
        ("/v1/models", local_openai_models),
    ):
        app.add_route(path, Passive(config, lifecycle, forwarder, local))
    demand = Demand(config, lifecycle, forwarder)
    app.add_sink(demand, r"^/api(/|$)")
    app.add_sink(demand, r"^/v1(/|$)")
    return app
