"""The stand-in CLI's command line: the subcommands `pulumi.automation` runs, and their output.

VERSION is what `pulumi version` prints. It decides how the SDK talks to us: above 3.205 the
SDK serves a gRPC `Events` stream (`--event-log tcp://…`) instead of tailing a file, and from
3.181 it passes `--client` to inline `refresh`/`destroy`. 3.272.0 is the CLI released with the
SDK pinned here, so the stand-in exercises the paths a current CLI takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from . import backend
from .backend import CliError, Workspace, mask, reveal

VERSION = "3.272.0"
FLAGS = {
    "--yes", "--skip-preview", "--json", "--show-secrets", "--non-interactive", "--all",
    "--clear-pending-creates", "--secret", "--plaintext", "--path", "--force", "--no-select",
    "--diff", "--refresh", "--suppress-outputs", "--suppress-progress", "--debug",
    "--preserve-config", "--expect-no-changes", "--continue-on-error",
}
# Flags the CLI declares as string arrays (cobra's StringArray): each use adds one value.
REPEATED = {"--import-pending-creates", "--target", "--exclude", "--replace", "--config"}


def parse(argv: list[str]) -> tuple[list[str], dict]:
    """Split arguments into positionals and options (`--name value`, `--name=value`, flags)."""
    positional: list[str] = []
    options: dict = {}
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            positional += argv[index + 1 :]
            break
        if arg.startswith("-") and len(arg) > 1:
            name, eq, value = arg.partition("=")
            if not eq and name in FLAGS:
                options[name] = True
            else:
                if not eq:
                    index += 1
                    if index >= len(argv):
                        raise CliError(f"flag needs an argument: {name}")
                    value = argv[index]
                if name in REPEATED:
                    options.setdefault(name, []).append(value)
                else:
                    options[name] = value
        else:
            positional.append(arg)
        index += 1
    return positional, options


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    argv = [a for a in argv if a != "--non-interactive"]
    if argv[:1] == ["version"]:
        print("v" + (env.get("STANDIN_PULUMI_VERSION") or VERSION))
        return 0
    if argv[:2] == ["config", "set-all"]:
        return config_set_all(argv[2:], env)
    positional, options = parse(argv)
    command = " ".join(positional[:2])
    if positional[:1] == ["plugin"]:
        return plugin(positional[1:], options, env)
    ws = Workspace(Path.cwd(), env)
    stack = options.get("--stack") or current_stack(ws)
    handlers = {
        "stack select": lambda: stack_select(ws, positional[2:3] or [stack]),
        "stack init": lambda: stack_init(ws, positional[2]),
        "stack ls": lambda: stack_ls(ws),
        "stack rm": lambda: stack_rm(ws, positional[2] if len(positional) > 2 else stack),
        "stack output": lambda: stack_output(ws, stack, options),
        "stack history": lambda: stack_history(ws, stack, options),
        "stack export": lambda: stack_export(ws, stack),
        "stack import": lambda: stack_import(ws, stack, options["--file"]),
        "config get": lambda: config_get(ws, stack, positional[2]),
        "config set": lambda: config_set(ws, stack, positional[2], positional[3], options),
        "config": lambda: config_show(ws, stack, options),
        "up": lambda: engine().up(ws, stack, options, env),
        "preview": lambda: engine().preview(ws, stack, options, env),
        "refresh": lambda: engine().refresh(ws, stack, options, env),
        "destroy": lambda: engine().destroy(ws, stack, options, env),
        "cancel": lambda: ws.backend.cancel(stack) or 0,
        "whoami": lambda: print("standin") or 0,
    }
    handler = handlers.get(command) or handlers.get(positional[0] if positional else "")
    if handler is None:
        raise CliError(f"the stand-in pulumi does not know `{' '.join(argv)}`")
    return handler() or 0


def engine():
    """The engine module, imported only for the commands that run one (gRPC is slow to load)."""
    from . import engine as module

    return module


def workspace_file(ws: Workspace) -> Path:
    """Where the selected stack is remembered, under PULUMI_HOME like the real CLI."""
    home = Path(ws.env.get("PULUMI_HOME") or Path.home() / ".pulumi")
    digest = hashlib.sha1(str(ws.cwd).encode()).hexdigest()
    return home / "workspaces" / f"{ws.project}-{digest}-workspace.json"


def current_stack(ws: Workspace) -> str:
    path = workspace_file(ws)
    return json.loads(path.read_text()).get("stack", "") if path.exists() else ""


def stack_select(ws: Workspace, names: list[str]) -> int:
    name = names[0] if names else ""
    if not name:
        raise CliError("no stack selected; pass --stack")
    ws.backend.require(name)
    path = workspace_file(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stack": name}))
    return 0


def stack_init(ws: Workspace, name: str) -> int:
    ws.require_passphrase()
    ws.backend.init(name)
    config = ws.read_config(name)
    config.setdefault("encryptionsalt", "v1:standin")
    ws.write_config(name, config)
    print(f"Created stack '{name}'")
    return stack_select(ws, [name])


def stack_ls(ws: Workspace) -> int:
    current = current_stack(ws)
    listing = []
    for name in ws.backend.stacks():
        entry = {"name": name, "current": name == current, "url": ws.backend.url}
        history = ws.backend.history(name)
        if history:
            entry["lastUpdate"] = history[0]["endTime"]
        entry["resourceCount"] = len(ws.backend.load(name)["resources"])
        entry["updateInProgress"] = any(ws.backend.lock_dir(name).glob("*.json"))
        listing.append(entry)
    print(json.dumps(listing, indent=2))
    return 0


def stack_rm(ws: Workspace, name: str) -> int:
    ws.backend.remove(name)
    ws.config_file(name).unlink(missing_ok=True)
    return 0


def stack_output(ws: Workspace, stack: str, options: dict) -> int:
    if options.get("--show-secrets"):
        ws.require_passphrase()
    outputs = ws.backend.outputs(stack)
    shown = reveal(outputs) if options.get("--show-secrets") else mask(outputs)
    print(json.dumps(shown, indent=2, sort_keys=True))  # Go's encoding/json sorts map keys
    return 0


def stack_history(ws: Workspace, stack: str, options: dict) -> int:
    history = ws.backend.history(stack)
    if "--page-size" in options:
        size, page = int(options["--page-size"]), int(options.get("--page", 1))
        history = history[(page - 1) * size : page * size]
    print(json.dumps(history, indent=2))
    return 0


def stack_export(ws: Workspace, stack: str) -> int:
    print(json.dumps({"version": 3, "deployment": ws.backend.load(stack)}, indent=2))
    return 0


def stack_import(ws: Workspace, stack: str, file: str) -> int:
    ws.backend.check_lock(stack)
    ws.backend.save(stack, json.loads(Path(file).read_text())["deployment"])
    print("Import complete.")
    return 0


def config_set_all(argv: list[str], env: dict) -> int:
    """`config set-all --stack S [--path] --plaintext k=v --secret k=v …` (flags take values)."""
    ws = Workspace(Path.cwd(), env)
    stack = ""
    pairs: list[tuple[str, bool]] = []
    args = iter(a for a in argv if a != "--path")
    for flag in args:
        value = next(args, "")
        if flag == "--stack":
            stack = value
        elif flag in ("--plaintext", "--secret"):
            pairs.append((value, flag == "--secret"))
        elif flag == "--json":
            for key, item in json.loads(value).items():
                ws.set_config(stack, key, str(item["value"]), bool(item.get("secret")))
    for pair, is_secret in pairs:
        key, _, value = pair.partition("=")
        ws.set_config(stack, key, value, is_secret)
    return 0


def config_set(ws: Workspace, stack: str, key: str, value: str, options: dict) -> int:
    ws.set_config(stack, key, value, bool(options.get("--secret")))
    return 0


def config_get(ws: Workspace, stack: str, key: str) -> int:
    values = ws.config_values(stack)
    full = ws.full_key(key)
    if full not in values:
        raise CliError(f"configuration key '{full}' not found for stack '{stack}'")
    value, is_secret = values[full]
    print(json.dumps({"value": value, "secret": is_secret}))
    return 0


def config_show(ws: Workspace, stack: str, options: dict) -> int:
    shown = {}
    for key, (value, is_secret) in ws.config_values(stack).items():
        visible = not is_secret or options.get("--show-secrets")
        shown[key] = {"value": value, "secret": is_secret} if visible else {"secret": True}
    print(json.dumps(shown, indent=2))
    return 0


def plugin(positional: list[str], options: dict, env: dict) -> int:
    if positional[:1] == ["ls"]:
        print(json.dumps(backend.plugins(env), indent=2))
        return 0
    if positional[:1] == ["install"] and len(positional) >= 4:
        kind, name, version = positional[1:4]
        backend.install_plugin(kind, name, version, options.get("-f") or options.get("--file"), env)
        return 0
    raise CliError(f"the stand-in pulumi does not know `plugin {' '.join(positional)}`")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(255)
