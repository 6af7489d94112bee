"""The GPU server's certificate, pinned by name: one definition for both upstream clients.

The stack's certificate is self-signed for a fixed name (`tls_server_name`), not for the
server's IP: both the forwarding client (aiohttp) and the probes (requests) verify against
that certificate alone and that name, through the one SSL context made here.
"""

from __future__ import annotations

import ssl

from requests.adapters import HTTPAdapter
from requests.certs import where as default_ca_bundle

from proxy.provision.base import Endpoint


def context(endpoint: Endpoint) -> ssl.SSLContext:
    """Verification against the endpoint's own CA certificate, else the public CAs."""
    return ssl.create_default_context(
        cafile=None if endpoint.ca_cert else default_ca_bundle(),
        cadata=endpoint.ca_cert or None,
    )


class PinnedAdapter(HTTPAdapter):
    """requests through the endpoint's context, checking the certificate's name, not the IP."""

    def __init__(self, endpoint: Endpoint, **kwargs):
        self._context = context(endpoint) if endpoint.url.startswith("https:") else None
        self._server_hostname = endpoint.server_hostname
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        if self._context is not None:
            pool_kwargs["ssl_context"] = self._context
        if self._server_hostname:
            pool_kwargs["server_hostname"] = self._server_hostname
            pool_kwargs["assert_hostname"] = self._server_hostname
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
