"""The upgrade to fleets: a stack made by the program before `servers` existed, updated by
today's program, keeps its instance.

The old stack is made by the old code itself: `infra/` as it was at BEFORE_FLEETS (the last
commit before `servers`), taken from the repository's history into a temporary tree and run
in a process of its own (its `infra` package is not this one), with today's `cloud-init/`
templates, so that only the program's change is under test. Then today's runner updates the
same stack, without `servers` (nothing may change), and with `servers: [gpu, gpu-1]`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from infra.runner import StackRunner
from tests.doubles.standin_pulumi.harness import ROOT, get_tags, settings_for, standin_world

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
REPO = ROOT.parents[2]
BEFORE_FLEETS = "4e9f7dd563a629e37a7c80cd9fca40ab3f6b52ad"
OLD_UP = textwrap.dedent("""
    import json, os, sys
    from infra.runner import StackRunner
    from tests.doubles.standin_pulumi.harness import ROOT, settings_for
    runner = StackRunner(settings_for(int(sys.argv[2])), sys.argv[1], os.environ,
                         pulumi_root=ROOT)
    print(json.dumps({"instance_id": runner.up(lambda _: None).instance_id}))
""")


@pytest.fixture
def standin(tmp_path):
    with standin_world(tmp_path) as world:
        yield world


def old_tree(tmp_path):
    """infra/ at BEFORE_FLEETS (from the git history) beside today's cloud-init/."""
    tree = tmp_path / "before-fleets"
    listed = git("ls-tree", "-r", "--name-only", BEFORE_FLEETS, "infra")
    for path in listed.splitlines():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(git("show", f"{BEFORE_FLEETS}:{path}"))
    assert "servers" not in (tree / "infra" / "settings.py").read_text()  # the old program
    shutil.copytree(REPO / "cloud-init", tree / "cloud-init")
    return tree


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=60) if shutil.which("git") else None
    if done is None or done.returncode != 0:
        pytest.skip(f"needs the repository's git history (commit {BEFORE_FLEETS[:7]})")
    return done.stdout


def test_a_stack_made_before_fleets_keeps_its_instance(standin, tmp_path):
    tree = old_tree(tmp_path)
    made = subprocess.run(
        [sys.executable, "-c", OLD_UP, str(standin.state_dir), str(standin.port)],
        cwd=tree, capture_output=True, text=True, timeout=120,
        env={**os.environ, **standin.env, "PYTHONPATH": f"{tree}{os.pathsep}{REPO}"})
    assert made.returncode == 0, made.stderr[-2000:]
    old_id = json.loads(made.stdout.strip().splitlines()[-1])["instance_id"]
    assert list(standin.instances()) == [old_id]
    runner = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT)
    before = runner.outputs()  # today's runner reads the old outputs (no `servers` map)
    assert before.instance_id == old_id and list(before.servers) == ["gpu"]
    said: list[str] = []

    upgraded = runner.up(said.append)

    assert len(said) == 1 and said[0].endswith(": 6 unchanged"), said  # no replace, no update
    assert upgraded.instance_id == old_id and list(standin.instances()) == [old_id]
    assert upgraded.servers["gpu"].instance_id == old_id
    said.clear()

    fleet = runner.up(said.append, servers={"gpu": "running", "gpu-1": "running"})

    assert fleet.servers["gpu"].instance_id == old_id
    assert set(standin.instances()) == {old_id, fleet.servers["gpu-1"].instance_id}
    assert not any(s.startswith(("replacing", "updating")) for s in said), said
    assert any(s.startswith("creating exoscale:ComputeInstance gpu-1") for s in said), said
    for server in fleet.servers.values():
        assert get_tags(server.remote_url, fleet.token, fleet.tls_certificate,
                        fleet.tls_server_name)["models"]
