"""S3's wire protocol for the store: where (an `s3://bucket/prefix` URL), signing (AWS
Signature V4) and the five calls the store makes (get, put with conditions, delete, list).

A small signer on `requests`: five calls do not need an SDK, and every call has the same short
timeouts (a slow store delays the sync loop, never a request, and the loop retries on its next
tick). Shapes follow the S3 API reference; the tests run it against moto's S3 server.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import parse_qs, quote, urlsplit

import requests

from proxy.config import ConfigError
from proxy.store.base import StoreError

TIMEOUT = (3.0, 5.0)  # connect, read (seconds)
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SOS_HOST = re.compile(r"^sos-([a-z0-9-]+)\.exo\.io$")
URL_PARAMETERS = ("endpoint", "region", "s3ForcePathStyle")  # the last as in Pulumi's URLs


@dataclass(frozen=True)
class S3Location:
    """Where the store lives: bucket, key prefix, endpoint and signing region."""

    bucket: str
    prefix: str
    endpoint: str
    region: str

    @classmethod
    def parse(cls, url: str, name: str = "PROXY_STATE_URL") -> S3Location:
        """`s3://bucket/prefix?endpoint=https://sos-at-vie-2.exo.io&region=at-vie-2`."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        example = "s3://bucket/prefix?endpoint=https://sos-at-vie-2.exo.io"
        if parts.scheme != "s3" or not BUCKET_NAME.match(parts.netloc):
            raise ConfigError(f"{name}={url!r} does not name a bucket; use e.g. {example}")
        unknown = sorted(set(query) - set(URL_PARAMETERS))
        if unknown:
            raise ConfigError(
                f"{name}={url!r} has unknown parameter {unknown[0]!r}; use endpoint and region"
            )
        endpoint = query.get("endpoint", [""])[-1].rstrip("/")
        host = urlsplit(endpoint).hostname or ""
        if urlsplit(endpoint).scheme not in ("http", "https") or not host:
            raise ConfigError(
                f"{name}={url!r} needs ?endpoint=https://…, the S3 endpoint of the bucket's "
                f"zone; use e.g. {example}"
            )
        zone = SOS_HOST.match(host)
        region = query.get("region", [zone.group(1) if zone else "us-east-1"])[-1]
        return cls(parts.netloc, parts.path.strip("/"), endpoint, region)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class Signer:
    """AWS Signature Version 4 for S3 requests (path-style URLs, payload hashed)."""

    def __init__(self, access_key: str, secret_key: str, region: str, token: str = ""):
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.token = token

    def sign(
        self, method: str, url: str, body: bytes, now: datetime | None = None
    ) -> dict[str, str]:
        """The headers that authenticate this request: Host, X-Amz-*, Authorization."""
        now = now or datetime.now(timezone.utc)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        parts = urlsplit(url)
        headers = {
            "host": parts.netloc,
            "x-amz-content-sha256": hashlib.sha256(body).hexdigest(),
            "x-amz-date": stamp,
        }
        if self.token:
            headers["x-amz-security-token"] = self.token
        names = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                method,
                parts.path or "/",
                _canonical_query(parts.query),
                "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers)),
                names,
                headers["x-amz-content-sha256"],
            ]
        )
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = f"AWS4{self.secret_key}".encode()
        for part in (stamp[:8], self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature}"
        )
        return headers


def _canonical_query(query: str) -> str:
    pairs = sorted(tuple(pair.partition("=")[::2]) for pair in query.split("&") if pair)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _encode(value: str, safe: str = "-_.~") -> str:
    return quote(value, safe=safe)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    etag: str | None


class S3Client:
    """The few S3 calls the store makes, signed, with short timeouts and no retries."""

    def __init__(self, location: S3Location, signer: Signer):
        self.location = location
        self.signer = signer
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=4)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def call(
        self,
        method: str,
        key: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request; StoreError when the store cannot be reached or answers 5xx."""
        origin = urlsplit(self.location.endpoint)
        path = f"{origin.path}/{self.location.bucket}"
        if key is not None:
            path += "/" + _encode(key, safe="/-_.~")
        query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted((params or {}).items()))
        url = f"{origin.scheme}://{origin.netloc}{path}" + (f"?{query}" if query else "")
        signed = self.signer.sign(method, url, body)
        try:
            answer = self.session.request(
                method, url, data=body or None, headers={**(headers or {}), **signed},
                timeout=TIMEOUT, allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise StoreError(
                f"state store {self.location}: cannot reach {self.location.endpoint} "
                f"({type(exc).__name__})"
            ) from None
        if answer.status_code >= 500:
            raise StoreError(
                f"state store {self.location}: {method} {key or 'bucket'} answered "
                f"{answer.status_code} {_error_code(answer.content)}".rstrip()
            )
        return Answer(answer.status_code, answer.content, answer.headers.get("ETag"))

    def get(self, key: str, etag: str | None = None) -> Answer:
        """The object; 304 when it still has `etag`, 404 when missing."""
        answer = self.call("GET", key, headers={"If-None-Match": etag} if etag else None)
        self._expect(answer, (200, 304, 404), "GET", key)
        return answer

    def put(
        self, key: str, body: bytes, *, if_match: str | None = None, create: bool = False
    ) -> str | None:
        """Write the object (if it still has `if_match`, or only if new); its ETag, or None
        when the condition failed because someone else wrote first."""
        headers = {"Content-Type": "application/json"}
        if if_match:
            headers["If-Match"] = if_match
        elif create:
            headers["If-None-Match"] = "*"
        answer = self.call("PUT", key, body=body, headers=headers)
        if (if_match or create) and _lost(answer):
            return None
        self._expect(answer, (200,), "PUT", key)
        if not answer.etag:
            raise StoreError(f"state store {self.location}: PUT {key} answered without an ETag")
        return answer.etag

    def delete(self, key: str) -> None:
        self._expect(self.call("DELETE", key), (200, 204, 404), "DELETE", key)

    def list(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` with its ETag."""
        found: dict[str, str] = {}
        token = ""
        while True:
            params = {"list-type": "2", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            answer = self.call("GET", params=params)
            self._expect(answer, (200,), "LIST", prefix)
            root = _xml(answer.body, self.location)
            for item in _children(root, "Contents"):
                found[_text(item, "Key")] = _text(item, "ETag")
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return found

    def _expect(self, answer: Answer, statuses: tuple[int, ...], verb: str, key: str) -> None:
        if answer.status not in statuses:
            raise StoreError(
                f"state store {self.location}: {verb} {key} answered {answer.status} "
                f"{_error_code(answer.body)}".rstrip()
            )

    def close(self) -> None:
        self.session.close()


def _lost(answer: Answer) -> bool:
    """A conditional write that someone else won: 412, 409 (two conditional writes at once),
    or 404 for If-Match on an object deleted meanwhile (not a missing bucket)."""
    if answer.status == 404:
        return _error_code(answer.body) != "NoSuchBucket"
    return answer.status in (409, 412)


def _xml(body: bytes, location: S3Location) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise StoreError(f"state store {location}: the listing is not XML") from None


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if child.tag.rsplit("}", 1)[-1] == name]


def _text(element: ElementTree.Element, name: str) -> str:
    found = _children(element, name)
    return (found[0].text or "") if found else ""


def _error_code(body: bytes) -> str:
    """S3's error code (e.g. NoSuchBucket) from an error body, or ''."""
    try:
        return _text(ElementTree.fromstring(body), "Code")
    except ElementTree.ParseError:
        return ""
