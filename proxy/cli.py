"""The console script `ollama-exoscale`: serve the proxy, or talk to a running one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import requests

from proxy.config import Config, ConfigError
from proxy.console import estimate, format_status, nothing_coming

# Exit codes a script can rely on.
OK, FAILED, USAGE, UNREACHABLE, TIMEOUT, NOTHING_COMING = 0, 1, 2, 3, 4, 5
PIPE_CLOSED = 128 + signal.SIGPIPE  # what a shell reports for a tool its reader left
# How long `wait` watches an idle proxy that nobody asked for a server: long enough for a
# request sent just before to reach the reconciler (a few ticks), short enough to be "at once".
IDLE_GRACE = 10.0

SERVE_FLAGS = {
    "bind": "PROXY_BIND",
    "workers": "PROXY_WORKERS",
    "max_connections": "PROXY_MAX_CONNECTIONS",
    "threads": "PROXY_THREADS",
    "provisioner": "PROXY_PROVISIONER",
    "idle_timeout": "PROXY_IDLE_TIMEOUT",
    "state_dir": "PROXY_STATE_DIR",
    "local_command": "PROXY_LOCAL_COMMAND",
    "local_addr": "PROXY_LOCAL_ADDR",
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return USAGE
    try:
        code = args.run(args)
        sys.stdout.flush()  # a reader that left shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # `status | head -3`: the reader has all it wanted; stop quietly, as CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except ConfigError as exc:
        print(f"ollama-exoscale: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ollama-exoscale",
        description="An on-demand GPU proxy for Ollama on Exoscale.",
    )
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the proxy under gunicorn")
    serve.add_argument("--bind", help="listen address (PROXY_BIND, default 127.0.0.1:11434)")
    serve.add_argument("--workers", help="gunicorn workers (PROXY_WORKERS, default 2)")
    serve.add_argument("--max-connections",
                       help="client connections per worker (PROXY_MAX_CONNECTIONS, default 1000)")
    serve.add_argument("--threads", help="threads per worker for its blocking calls, off the "
                       "event loop (PROXY_THREADS, default 32)")
    serve.add_argument("--provisioner", help="exoscale or local (PROXY_PROVISIONER)")
    serve.add_argument("--idle-timeout", help="seconds (PROXY_IDLE_TIMEOUT, default 1800)")
    serve.add_argument("--state-dir", help="local state (PROXY_STATE_DIR)")
    serve.add_argument("--local-command", help="with local: the command (PROXY_LOCAL_COMMAND)")
    serve.add_argument("--local-addr", help="with local: where it listens (PROXY_LOCAL_ADDR)")
    serve.set_defaults(run=serve_command)

    status = commands.add_parser("status", help="print a running proxy's status")
    _client_flags(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    status.set_defaults(run=status_command)

    up = commands.add_parser("up", help="start the GPU server now (pre-warm; admin key)")
    _client_flags(up)
    up.add_argument("--wait", action="store_true", help="show progress until ready")
    up.add_argument("--timeout", type=float, default=1800, help="with --wait: seconds")
    up.set_defaults(run=up_command)

    down = commands.add_parser(
        "down", help="remove the GPU server now, once its streams end (admin key)"
    )
    _client_flags(down)
    down.add_argument("--wait", action="store_true", help="show progress until it is removed")
    down.add_argument("--timeout", type=float, default=1800, help="with --wait: seconds")
    down.set_defaults(run=down_command)

    bake = commands.add_parser(
        "bake", help="make a private template of the GPU server (driver, Docker, the toolkit, "
        "the Ollama image), bringing one up if none; prints the settings to use it (admin key)")
    _client_flags(bake)
    bake.add_argument("--models", action="store_true",
                      help="keep the models in the template too (a bigger template, no pull)")
    bake.add_argument("--timeout", type=float, default=3600, help="seconds (default 3600)")
    bake.set_defaults(run=bake_command)

    wait = commands.add_parser("wait", help="block until the GPU server is ready")
    _client_flags(wait)
    wait.add_argument("--up", action="store_true",
                      help="ask for the GPU server first (as `up`; an admin key when keys are set)")
    wait.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    wait.set_defaults(run=wait_command)

    doctor = commands.add_parser(
        "doctor", help="check what the chosen provisioner (PROXY_PROVISIONER) needs, and say "
        "how to fix it"
    )
    doctor.add_argument("--preview", action="store_true",
                        help="then a `pulumi preview` against Exoscale (creates nothing)")
    doctor.set_defaults(run=doctor_command)
    return parser


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the proxy (default: http://PROXY_BIND)")
    parser.add_argument("--key", help="API key (default: OLLAMA_API_KEY)")


def serve_command(args: argparse.Namespace) -> int:
    for flag, variable in SERVE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[variable] = str(value)
    config = Config.from_env()  # a bad value stops here, before gunicorn starts
    from proxy.provision.local import make_provisioner

    make_provisioner(config)
    from proxy.store import open_store

    open_store(config.state_url, config.state_dir).close()  # a bad store: one line, here
    from gunicorn.app.wsgiapp import WSGIApplication  # loads an ASGI app as well

    conf = Path(__file__).with_name("gunicorn_conf.py")
    sys.argv = ["ollama-exoscale serve", "-c", str(conf), "proxy.asgi:create()"]
    WSGIApplication("%(prog)s").run()
    return OK


def up_command(args: argparse.Namespace) -> int:
    return _ask(args, "/admin/up", "provisioning requested", goal="ready")


def down_command(args: argparse.Namespace) -> int:
    return _ask(args, "/admin/down", "removal requested", goal="idle")


def _ask(args: argparse.Namespace, path: str, said: str, goal: str) -> int:
    """POST an admin route; with --wait, follow the lifecycle until `goal`."""
    status = call(args, "POST", path, expected=202)
    if isinstance(status, int):
        return status
    if not args.wait:
        print(f"{said} ({status.get('provisioning_status')})")
        return OK
    if goal == "idle":
        time.sleep(1.0)  # the reconciler takes the removal on its next tick
    return follow(args, goal=goal, asked=True)


def bake_command(args: argparse.Namespace) -> int:
    """POST /admin/bake, follow its steps until the bake ends, print the two lines to set."""
    asked = call(args, "POST", "/admin/bake?models=" + ("1" if args.models else "0"),
                 expected=202)
    if isinstance(asked, int):
        return asked
    requested = asked["bake_requested_at"]
    started = time.monotonic()
    seen: set[tuple[str, str]] = set()
    while True:
        status = fetch_status(args)
        if isinstance(status, int):
            return status
        for step in status.get("steps") or []:
            if (step.get("at"), step.get("text")) not in seen:
                seen.add((step.get("at"), step.get("text")))
                print(f"[{time.monotonic() - started:5.0f} s] {step.get('phase')}: "
                      f"{step.get('text')}", flush=True)
        bake = status.get("bake") or {}
        if (bake.get("requested_at") or 0) >= requested and not bake.get("running"):
            if bake.get("error"):
                print(f"ollama-exoscale: the bake failed: {bake['error']}", file=sys.stderr)
                return FAILED
            print("Set these to use the template (EXOSCALE_TEMPLATE_VISIBILITY: a private one):")
            print(f"EXOSCALE_TEMPLATE={bake['template']}")
            print("EXOSCALE_TEMPLATE_VISIBILITY=private")
            return OK
        if time.monotonic() - started > args.timeout:
            print(f"ollama-exoscale: the bake did not end in {args.timeout:g} s (phase "
                  f"{status.get('provisioning_status')})", file=sys.stderr)
            return TIMEOUT
        time.sleep(1.0)


def wait_command(args: argparse.Namespace) -> int:
    if args.up:  # `wait --up` is `up --wait`
        args.wait = True
        return _ask(args, "/admin/up", "provisioning requested", goal="ready")
    return follow(args, goal="ready")


def follow(args: argparse.Namespace, goal: str, asked: bool = False) -> int:
    """Show each phase and every progress step until `goal` (0), error (1), timeout (4) or,
    waiting for `ready` on an idle proxy that nothing will start, a few seconds (5)."""
    started = time.monotonic()
    seen: set[tuple[str, str]] = set()  # steps printed, by (at, text)
    last: tuple[str, str] | None = None  # the (phase, sentence) printed last
    estimated = False
    idle_since: float | None = None  # when `wait` found the proxy idle with nothing coming
    while True:
        status = fetch_status(args)
        if isinstance(status, int):
            return status
        phase, detail = status.get("provisioning_status") or "", status.get("detail") or ""
        steps = status.get("steps") or []
        lines = [(s.get("phase") or phase, s.get("text") or "") for s in steps
                 if (s.get("at"), s.get("text")) not in seen]
        seen.update((s.get("at"), s.get("text")) for s in steps)
        if (phase, detail) != (lines[-1] if lines else last):
            lines.append((phase, detail))
        for line in lines:
            elapsed = time.monotonic() - started
            print(f"[{elapsed:5.0f} s] {line[0]}{': ' + line[1] if line[1] else ''}", flush=True)
            last = line
        if goal == "ready" and not estimated and phase in ("provisioning", "starting"):
            estimated = True
            print(f"          {estimate(status)}", flush=True)
        if phase == goal:
            return OK
        if phase == "error":
            print(f"ollama-exoscale: {status.get('last_error')}", file=sys.stderr)
            return FAILED
        why = nothing_coming(status, started + args.timeout - time.monotonic(), asked) \
            if goal == "ready" else ""
        if not why:
            idle_since = None
        elif idle_since is None:  # said at once, then a few seconds for a request on its way
            idle_since = time.monotonic()
            print(f"ollama-exoscale: {why}; giving up in {IDLE_GRACE:g} s unless something "
                  "starts it", file=sys.stderr, flush=True)
        elif time.monotonic() - idle_since >= IDLE_GRACE:
            print(f"ollama-exoscale: still {phase} after {IDLE_GRACE:g} s: nothing started the "
                  "GPU server", file=sys.stderr)
            return NOTHING_COMING
        if time.monotonic() - started > args.timeout:
            print(f"ollama-exoscale: not {goal} after {args.timeout:g} s (phase {phase})",
                  file=sys.stderr)
            return TIMEOUT
        time.sleep(1.0)


def doctor_command(args: argparse.Namespace) -> int:
    """Each prerequisite of the chosen provisioner on a line: ok or FAIL, what was found, and
    the fix."""
    config = Config.from_env()
    if config.provisioner == "local":  # no Pulumi, no cloud: a program and an address
        from proxy.provision.local_checks import run_local_checks

        return FAILED if _show_checks(run_local_checks(config)) else OK
    from infra.doctor import run_checks
    from infra.settings import Settings, SettingsError

    failed = _show_checks(run_checks(config.env, config.state_dir))
    try:
        settings = Settings.from_env(config.env)
        print("ok    settings: the Exoscale settings are valid")
    except SettingsError as exc:
        failed.append(exc)
        print(f"FAIL  settings: {exc}")
    if getattr(args, "preview", False):
        failed += _preview(settings if not failed else None, config)
    return FAILED if failed else OK


def _show_checks(checks: list) -> list:
    """Print each check (and the fix of a failed one); the failed ones."""
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print(f"      fix: {check.fix}")
    return [check for check in checks if not check.ok]


def _preview(settings: Any, config: Config) -> list[object]:
    """`doctor --preview`: what `pulumi up` would do, or the provider's error (a failure)."""
    if settings is None:
        print("FAIL  preview: not run; fix the failures above first")
        return ["preview"]
    from infra.doctor import run_preview

    check, planned = run_preview(settings, config.env, config.state_dir)
    failed = _show_checks([check])
    for step in planned:
        print(f"      {step}")
    return failed


def _client(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    url = args.url or "http://" + Config.from_env().bind
    if "://" not in url:
        url = "http://" + url
    key = args.key or os.environ.get("OLLAMA_API_KEY")
    return url.rstrip("/"), ({"Authorization": f"Bearer {key}"} if key else {})


def call(
    args: argparse.Namespace, method: str, path: str, expected: int = 200
) -> dict[str, Any] | int:
    """The proxy's JSON answer, or an exit code after saying what went wrong."""
    url, headers = _client(args)
    try:
        answer = requests.request(method, url + path, headers=headers, timeout=10)
    except requests.RequestException as exc:
        print(f"ollama-exoscale: no proxy answers at {url} ({type(exc).__name__})", file=sys.stderr)
        return UNREACHABLE
    if answer.status_code != expected:
        print(f"ollama-exoscale: {url}{path} answered HTTP {answer.status_code}: "
              f"{_error_of(answer)}", file=sys.stderr)
        return FAILED
    return answer.json()


def fetch_status(args: argparse.Namespace) -> dict[str, Any] | int:
    return call(args, "GET", "/status")


def status_command(args: argparse.Namespace) -> int:
    status = fetch_status(args)
    if isinstance(status, int):
        return status
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return FAILED if status.get("provisioning_status") == "error" else OK


def _error_of(answer: requests.Response) -> str:
    try:
        error = answer.json().get("error")
    except ValueError:
        return answer.text[:200]
    return error.get("message") if isinstance(error, dict) else str(error)


if __name__ == "__main__":
    sys.exit(main())
