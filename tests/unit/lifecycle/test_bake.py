"""The lifecycle while a template is baked (POST /admin/bake, Lifecycle.bake): demand is held with a
503 that says so, no bring-up and no idle removal start meanwhile, and the server serves again
(or goes idle) when the bake ends."""

from __future__ import annotations

import time

from proxy.lifecycle.demand import Lifecycle
from proxy.lifecycle.status import refusal, status_document
from proxy.provision.base import Endpoint
from tests.doubles.provisioners import BakingProvisioner, GatedProvisioner
from tests.harness import wait_until


def phase_of(life: Lifecycle) -> str:
    return life.snapshot().state.phase


def ask_bake(life: Lifecycle, models: bool = False) -> float:
    """What POST /admin/bake does."""
    return life.bake(models)


def test_demand_is_held_while_baking_then_the_server_serves_again(make, upstream):
    provisioner = BakingProvisioner(Endpoint(upstream.url))
    life = make(provisioner, idle_timeout=0.2)
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
    asked = ask_bake(life, models=True)
    wait_until(lambda: phase_of(life) == "baking" and provisioner.bakes == 1, 10, what="baking")
    assert life.admit() is None  # held: a 503, counted as demand
    why = refusal(life.config, life, life.snapshot())
    assert why.phase == "baking" and "baking a template" in why.message
    time.sleep(0.5)  # past the idle timeout, with demand waiting: neither removal nor bring-up
    assert phase_of(life) == "baking"
    assert (provisioner.bring_ups, provisioner.tear_downs, provisioner.stops) == (1, 0, 0)
    provisioner.bake_gate.set()
    wait_until(lambda: phase_of(life) == "ready", 10, what="serving again")
    assert provisioner.resumes == 1 and provisioner.bring_ups == 1
    bake = status_document(life.config, life)["bake"]
    assert bake == {"running": False, "pending": False, "requested_at": asked, "models": True,
                    "template": "ollama-exoscale-test-1", "error": None}


def test_a_bake_from_idle_brings_a_server_up_and_removes_it_after(make, upstream):
    provisioner = BakingProvisioner(Endpoint(upstream.url))
    provisioner.bake_gate.set()
    life = make(provisioner)
    ask_bake(life)
    wait_until(lambda: provisioner.bakes == 1 and phase_of(life) == "idle", 15,
               what="baked, then idle")
    assert (provisioner.bring_ups, provisioner.tear_downs, provisioner.resumes) == (1, 1, 0)
    assert life.snapshot().state.bake_template == "ollama-exoscale-test-1"


def test_a_failed_bake_says_why_and_the_server_comes_back(make, upstream):
    provisioner = BakingProvisioner(Endpoint(upstream.url))
    provisioner.bake_fails_with = "promoting the snapshot failed: quota"
    provisioner.bake_gate.set()
    life = make(provisioner)
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
    life.finish(life.admit())  # it has served since ready: it serves again after the bake
    time.sleep(0.1)
    ask_bake(life, models=True)  # the test's upstream pulls nothing back
    wait_until(lambda: provisioner.bakes == 1 and phase_of(life) == "ready"
               and life.snapshot().state.bake_error, 10, what="ready after the failed bake")
    assert life.snapshot().state.bake_error == "promoting the snapshot failed: quota"
    assert provisioner.resumes == 1


def test_a_provisioner_that_cannot_bake_says_which_one_is_needed(make, upstream):
    life = make(GatedProvisioner(Endpoint(upstream.url)))
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
    life.finish(life.admit())
    time.sleep(0.1)
    ask_bake(life)
    wait_until(lambda: life.snapshot().state.bake_error, 10, what="the bake refused")
    assert "PROXY_PROVISIONER=exoscale" in life.snapshot().state.bake_error
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready again")


def test_a_bake_asked_for_while_the_bring_up_failed_is_dropped_with_the_reason(make, upstream):
    provisioner = BakingProvisioner(Endpoint(upstream.url))
    provisioner.fail_with = "quota exceeded for gpua5000"
    life = make(provisioner, retry_base=30.0)
    life.want()
    wait_until(lambda: phase_of(life) == "error", 5, what="error")
    ask_bake(life)
    wait_until(lambda: life.snapshot().state.bake_error, 5, what="the bake dropped")
    assert "quota exceeded" in life.snapshot().state.bake_error
    assert provisioner.bakes == 0 and provisioner.bring_ups == 1
