"""The proxy's gunicorn worker: gthread that takes a new connection only while a thread is free.

gthread's workers each accept from the shared socket and queue what they accept for their own
threads. Under a burst (100 streams at once on 2 workers × 32 threads) one worker queued 77
connections behind its 32 threads while the other had threads to spare (bench/RESULTS.md).
Accepting only while a thread is free leaves the rest in the listen backlog, for whichever
worker frees a thread first. Kept-alive connections wait in the poller, holding no thread,
and are not counted.
"""

from __future__ import annotations

from gunicorn.workers import gthread


class ThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy = 0  # connections handed to the threads and not finished; main loop only

    def enqueue_req(self, conn) -> None:
        self.busy += 1
        if self.busy >= self.cfg.threads:
            self.set_accept_enabled(False)
        super().enqueue_req(conn)

    def finish_request(self, conn, fs) -> None:
        self.busy -= 1  # before: finishing may hand the connection's next request back
        super().finish_request(conn, fs)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop re-enables accepting below worker_connections; not while all are busy.
        super().set_accept_enabled(enabled and self.busy < self.cfg.threads)
