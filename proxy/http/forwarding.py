"""Every other Ollama route (/api/*, /v1/*): forwarded when the GPU server is ready; else
it is demand that wakes the GPU, held a while if the client asks (`Prefer: wait`), then a 503
whose wording and Retry-After the lifecycle gives (proxy/lifecycle/status.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import falcon

from proxy.config import Config
from proxy.http.errors import error_json, is_openai
from proxy.http.metrics import HELD
from proxy.lifecycle.demand import Lifecycle, Ticket
from proxy.lifecycle.snapshot import Snapshot
from proxy.lifecycle.status import refusal
from proxy.upstream.errors import UpstreamError
from proxy.upstream.forward import Forwarder

# A 503 answer is computed once per snapshot and kept this long (Retry-After is whole
# seconds): a burst of demand while provisioning would otherwise redo it for every request.
ANSWER_TTL = 0.25
_PREFER_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
PREFER_DIGITS = 9  # a longer `wait=` is more than any PROXY_MAX_HOLD: read as "as long as allowed"
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
        if ticket is None and self.lifecycle.refresh_needed() and \
                await asyncio.to_thread(self.lifecycle.refresh):
            ticket = self.lifecycle.admit()
        if ticket is None:
            ticket = await self._hold(req, resp)
        if ticket is None:
            self._unavailable(req, resp)
            return
        await forward(self.forwarder, self.lifecycle, self.config, req, resp, ticket)

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
        why = refusal(self.config, self.lifecycle, snapshot)
        if is_openai(path):
            body = error_json(path, why.message, type="service_unavailable", code=why.code)
        else:
            body = error_json(path, why.message, provisioning=why.provisioning,
                              status=why.phase, retry_after=why.retry_after)
        return str(why.retry_after), body.decode()


async def hold(lifecycle: Lifecycle, seconds: float) -> Snapshot:
    """Wait up to `seconds` for ready (or error), looking at the snapshot once a tick: a
    coroutine on the event loop, not a thread (the sync loop replaces the snapshot)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        snapshot = lifecycle.snapshot()
        left = deadline - loop.time()
        if snapshot.state.phase in ("ready", "error") or left <= 0 or lifecycle.closing:
            return snapshot
        await asyncio.sleep(min(left, lifecycle.config.tick))


async def forward(forwarder, lifecycle, config, req, resp, ticket: Ticket) -> None:
    req.context.forwarded = True
    try:
        await forwarder.forward(
            req, resp, ticket.endpoint, lambda: lifecycle.finish(ticket),
            strip_authorization=config.auth_enabled,
            body_limit=forwarder.body_limit(req.path, config.max_body, config.max_blob),
            # The upstream may be gone: passed over a while, and probed now.
            on_broken=lambda: lifecycle.broke(ticket),
        )
    except UpstreamError as exc:
        if exc.status in (502, 504):
            lifecycle.broke(ticket)  # unreachable or hung: probed now, not in 15 s
        status = "499 Client Closed Request" if exc.status == 499 else exc.status  # nginx's
        # A body that stalled was not read to its end: the connection cannot carry another.
        headers = {"Connection": "close"} if exc.status in (408, 413) else None
        raise falcon.HTTPError(
            falcon.code_to_http_status(status), description=str(exc), headers=headers
        ) from None
