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

The calls themselves (signing, conditions, listing) are proxy/store/s3client.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from proxy.config import ConfigError
from proxy.store.base import StoreError, WorkerReport
from proxy.store.s3client import S3Client, S3Location, Signer

DOCUMENT = "lifecycle.json"
LEASE = "lease.json"
WORKERS = "workers/"

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

    def change_counter(self) -> None:
        return None  # other hosts write this store too: a counter of this host proves nothing

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
            float(fields.get("bake_at", 0.0)),
            bool(fields.get("bake_models", False)),
            {str(k): int(v) for k, v in (fields.get("inflight_by") or {}).items()},
            float(fields.get("up_at", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
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
