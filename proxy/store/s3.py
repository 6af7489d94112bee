"""The coordination store on S3-compatible object storage, shared by several proxy hosts.

Objects under `s3://bucket/prefix` (Exoscale SOS in production, moto's server in tests):
- `lifecycle.json`: the lifecycle document, written only by the lease holder, always with
  `If-Match: <the ETag it last read or wrote>` (`If-None-Match: *` for the first write);
- `lease.json`: the lease, taken or renewed with the same two conditions on its ETag;
- `workers/<id>.json`: one demand report per worker, written unconditionally by its worker.

A conditional write that loses (412, or 409 for two conditional writes in flight at once, or
404 for If-Match on a missing object) means someone else wrote first: the caller re-reads.

Fencing without trusting clocks across hosts: a holder stops writing the document once its own
monotonic clock says its lease may have lapsed (renewal start + ttl - margin), while a
taker waits until it has watched the same lease record (same ETag) for a whole ttl on its own
clock, unless the record is released or stale by more than a ttl on the wall clock. Should a
write still race a take-over, the document's ETag check makes one of the two writers lose.

Requests are signed with AWS Signature V4 by a small signer on `requests`: five calls do not
need an SDK, and every call has the same short timeouts (a slow store delays the sync loop,
never a request thread, and the loop retries on its next tick).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import requests

from proxy.config import ConfigError
from proxy.store.base import StoreError, WorkerReport

DOCUMENT = "lifecycle.json"
LEASE = "lease.json"
WORKERS = "workers/"
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


@dataclass(frozen=True)
class LeaseRecord:
    holder: str = ""
    expires_at: float = 0.0  # the holder's wall clock; 0 once released
    ttl: float = 0.0
    epoch: int = 0  # +1 each time the lease changes hands


class S3Store:
    """The Store on an S3 bucket; see the module docstring for the objects and the fencing."""

    def __init__(self, client: S3Client):
        self.client = client
        self.location = client.location
        self._doc_lock = threading.Lock()  # orders this process's document reads and writes
        self._doc: dict[str, Any] = {}
        self._doc_etag: str | None = None
        self._reports_lock = threading.Lock()
        self._reports: dict[str, tuple[str, WorkerReport]] = {}  # key → (ETag, report)
        self._lease_lock = threading.Lock()
        self._lease = LeaseRecord()
        self._lease_etag: str | None = None
        self._lease_seen = 0.0  # monotonic time this process first saw _lease_etag
        self._held: tuple[str, int, float] | None = None  # holder, epoch, valid until (monotonic)

    # -- the lifecycle document ---------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        with self._doc_lock:
            answer = self.client.get(self.location.key(DOCUMENT), self._doc_etag)
            if answer.status == 404:
                self._doc, self._doc_etag = {}, None
            elif answer.status == 200:
                self._doc, self._doc_etag = self._json(answer.body, DOCUMENT), answer.etag
            doc = dict(self._doc)
        doc.pop("_fence", None)
        return doc

    def save(self, doc: dict[str, Any], holder: str) -> bool:
        with self._doc_lock:
            fence = self._fence(holder)
            if fence is None:
                return False
            stored = {**doc, "_fence": fence}
            etag = self.client.put(
                self.location.key(DOCUMENT), _dump(stored),
                if_match=self._doc_etag, create=self._doc_etag is None,
            )
            if etag is None:
                return False  # another holder wrote since this one last read
            self._doc, self._doc_etag = stored, etag
            return True

    def _fence(self, holder: str) -> dict[str, Any] | None:
        """Who writes and in which lease term; None if `holder` may not write now."""
        with self._lease_lock:
            held = self._held
        if held is None or held[0] != holder or time.monotonic() >= held[2]:
            return None
        return {"holder": holder, "epoch": held[1]}

    # -- demand reports -------------------------------------------------------------------------

    def report(self, report: WorkerReport) -> None:
        self.client.put(self._report_key(report.worker), _dump(asdict(report)))

    def reports(self) -> list[WorkerReport]:
        """Every report: one listing, then a GET only for those whose ETag changed."""
        listed = self.client.list(self.location.key(WORKERS))
        with self._reports_lock:
            known = dict(self._reports)
        fresh: dict[str, tuple[str, WorkerReport]] = {}
        for key, etag in listed.items():
            if key in known and _same(known[key][0], etag):
                fresh[key] = known[key]
                continue
            answer = self.client.get(key)
            if answer.status == 200:
                report = _report(self._json(answer.body, key), self.location)
                fresh[key] = (answer.etag or etag, report)
        with self._reports_lock:
            self._reports = fresh
        return [report for _, report in fresh.values()]

    def forget(self, worker: str) -> None:
        self.client.delete(self._report_key(worker))

    def _report_key(self, worker: str) -> str:
        return self.location.key(f"{WORKERS}{worker}.json")

    # -- the lease ------------------------------------------------------------------------------

    def acquire(self, holder: str, ttl: float) -> bool:
        with self._lease_lock:
            started = time.monotonic()
            record, etag = self._read_lease()
            if etag is not None and record.holder != holder and not self._lapsed(record):
                self._held = None
                return False
            epoch = record.epoch + (record.holder != holder)
            new = LeaseRecord(holder, time.time() + ttl, ttl, epoch)
            written = self.client.put(
                self.location.key(LEASE), _dump(asdict(new)), if_match=etag, create=etag is None
            )
            if written is None:
                self._held = None
                return False
            self._remember(new, written)
            # Stop writing a margin before a taker could possibly see the lease as lapsed.
            self._held = (holder, epoch, started + ttl - min(ttl / 5, 2.0))
            return True

    def release(self, holder: str) -> None:
        with self._lease_lock:
            self._held = None
            record, etag = self._read_lease()
            if etag is None or record.holder != holder:
                return
            released = LeaseRecord(holder, 0.0, record.ttl, record.epoch)
            written = self.client.put(
                self.location.key(LEASE), _dump(asdict(released)), if_match=etag
            )
            if written:
                self._remember(released, written)

    def lease(self) -> tuple[str, float]:
        with self._lease_lock:
            record, _ = self._read_lease()
        return record.holder, record.expires_at

    def _read_lease(self) -> tuple[LeaseRecord, str | None]:
        answer = self.client.get(self.location.key(LEASE), self._lease_etag)
        if answer.status == 404:
            self._lease, self._lease_etag = LeaseRecord(), None
        elif answer.status == 200:
            fields = self._json(answer.body, LEASE)
            try:
                record = LeaseRecord(**fields)
            except TypeError:
                raise StoreError(f"state store {self.location}: {LEASE} is not a lease") from None
            self._remember(record, answer.etag)
        return self._lease, self._lease_etag

    def _remember(self, record: LeaseRecord, etag: str | None) -> None:
        if not _same(etag, self._lease_etag):
            self._lease_seen = time.monotonic()
        self._lease, self._lease_etag = record, etag

    def _lapsed(self, record: LeaseRecord) -> bool:
        """Released, or unchanged for a whole ttl as watched here (no clock comparison), or
        stale by more than a ttl on the wall clock (hosts' clocks agree far better than that)."""
        if record.expires_at == 0 or not record.holder:
            return True
        watched = time.monotonic() - self._lease_seen
        return watched >= record.ttl or time.time() > record.expires_at + record.ttl

    # -- helpers --------------------------------------------------------------------------------

    def _json(self, body: bytes, key: str) -> dict[str, Any]:
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise StoreError(f"state store {self.location}: {key} is not a JSON object")
        return value

    def close(self) -> None:
        self.client.close()


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip('"') == b.strip('"')


def _report(fields: dict[str, Any], where: S3Location) -> WorkerReport:
    try:
        return WorkerReport(
            str(fields["worker"]),
            int(fields.get("inflight", 0)),
            float(fields.get("last_activity", 0.0)),
            float(fields.get("wanted_at", 0.0)),
            float(fields.get("heartbeat", 0.0)),
            float(fields.get("down_at", 0.0)),
        )
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"state store {where}: a worker report is malformed") from None


def open_s3_store(url: str, env: Mapping[str, str]) -> S3Store:
    """The S3 store at `url`, checked: ConfigError (one line naming PROXY_STATE_URL) when the
    URL is malformed, the credentials are missing, or the bucket cannot be reached."""
    location = S3Location.parse(url)
    access_key = env.get("AWS_ACCESS_KEY_ID", "").strip()
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "").strip()
    if not access_key or not secret_key:
        raise ConfigError(
            f"PROXY_STATE_URL={url!r} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(an access key allowed to read and write that bucket)"
        )
    signer = Signer(access_key, secret_key, location.region, env.get("AWS_SESSION_TOKEN", ""))
    client = S3Client(location, signer)
    try:
        answer = client.call("HEAD")
    except StoreError as exc:
        client.close()
        raise ConfigError(f"PROXY_STATE_URL={url!r}: {_after_location(exc)}") from None
    if answer.status != 200:
        client.close()
        raise ConfigError(f"PROXY_STATE_URL={url!r}: {_bucket_problem(location, answer.status)}")
    return S3Store(client)


def _after_location(exc: StoreError) -> str:
    return str(exc).split(": ", 1)[-1]


def _bucket_problem(location: S3Location, status: int) -> str:
    if status == 404:
        return f"bucket {location.bucket!r} does not exist at {location.endpoint}"
    if status == 403:
        return (
            f"access to bucket {location.bucket!r} denied; check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
        )
    if status in (301, 307):
        return f"bucket {location.bucket!r} is in another region than {location.region!r}"
    return f"bucket {location.bucket!r} answered {status}"
