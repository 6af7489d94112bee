"""nginx as the practical floor: proxy_pass to the upstream, unbuffered both ways, pooled.

Every path nginx writes is under the prefix directory, so it runs as any user:
`nginx -p PREFIX -c PREFIX/nginx.conf -e PREFIX/error.log`.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG = """\
daemon off;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream ollama {{
        server {upstream_host}:{upstream_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;

        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 900s;
        }}
    }}
}}
"""


def write_config(prefix: Path, port: int, upstream: tuple[str, int]) -> Path:
    """nginx.conf under `prefix` (created); returns its path."""
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)  # run as root, nginx's workers are `nobody`: they must reach the prefix
    conf = prefix / "nginx.conf"
    conf.write_text(CONFIG.format(
        workers=os.cpu_count() or 1, prefix=prefix, port=port,
        upstream_host=upstream[0], upstream_port=upstream[1],
    ))
    return conf
