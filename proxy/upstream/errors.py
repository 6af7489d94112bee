"""What can go wrong on the way to the upstream, as the client will hear it.

`UpstreamError` carries the status the client gets (502, 504, 499, 408, 413); its message is a
short cause without URLs or headers (they may carry the token).
"""

from __future__ import annotations


class UpstreamError(Exception):
    """The request could not be completed upstream: 502, 504, 499 (client gone), 408 (its body
    stalled) or 413 (its body too large)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLarge(Exception):
    """A chunked request body grew past the limit while it was being sent upstream."""


class BodyStalled(Exception):
    """A piece of the request body did not arrive within PROXY_CLIENT_TIMEOUT."""


class ClientGone(Exception):
    """The client closed its connection before the upstream answered."""


class Malformed(Exception):
    """The upstream's answer breaks HTTP's framing or carries what may not be forwarded."""


def timed_out(seconds: float) -> UpstreamError:
    return UpstreamError(504, f"the upstream Ollama did not answer within {seconds:g} s")


def unreachable(exc: Exception) -> UpstreamError:
    return UpstreamError(502, f"the upstream Ollama is unreachable ({reason(exc)})")


def malformed(why: str) -> UpstreamError:
    first = why.splitlines()[0] if why else "malformed"
    return UpstreamError(502, f"the upstream Ollama's answer is not valid HTTP: {first}")


def reason(exc: BaseException) -> str:
    """A short cause without URLs or headers (they may carry a token)."""
    text = str(exc).lower()
    for needle, reason in (
        ("certificate", "TLS certificate did not verify"),
        ("refused", "connection refused"),
        ("connect call failed", "connection refused"),
        ("name or service not known", "unknown host"),
        ("failed to resolve", "unknown host"),
        ("cannot connect to host", "connection failed"),
        ("reset", "connection reset"),
        ("timeout", "timed out"),
        ("timed out", "timed out"),
        ("not completed", "body cut short"),
        ("disconnected", "connection closed"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
