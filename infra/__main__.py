"""`pulumi up` / `pulumi destroy` at the repository root (Pulumi.yaml: `main: infra/`).

Reads the stack's `ollama-exoscale:*` configuration; a bad value stops here, with one line,
before any resource is declared.
"""

import sys
from pathlib import Path

# Pulumi runs this file as a script: make the repository (the `infra` package) importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.program import declare  # noqa: E402
from infra.settings import Settings, SettingsError  # noqa: E402


def main() -> None:
    try:
        settings = Settings.from_pulumi_config()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    declare(settings)


main()
