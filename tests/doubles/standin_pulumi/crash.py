"""`python -m tests.doubles.standin_pulumi.crash STATE_DIR PORT [SERVERS]`: an `up` for a test
to kill mid-way (SERVERS: the JSON map of servers it declares; none: today's one server).

Run with STANDIN_UP_HANG=1 in the environment: the stand-in CLI creates the instance, then hangs
holding the lock with the create still pending, as a proxy host that crashes mid-update would
leave it. The environment is the runner's (the test passes its own).
"""

from __future__ import annotations

import json
import os
import sys

from infra.runner import StackRunner

from .harness import ROOT, settings_for


def main() -> None:
    state_dir, port = sys.argv[1], int(sys.argv[2])
    servers = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    runner = StackRunner(settings_for(port), state_dir, os.environ, pulumi_root=ROOT)
    runner.up(lambda sentence: print(sentence, flush=True), servers=servers)


if __name__ == "__main__":
    main()
