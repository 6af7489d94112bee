"""The fleet's scaling step as a table: its servers, the requests in flight, a clock and the
config in; one step out. No threads, no store, no sleeps."""

from __future__ import annotations

import pytest

from proxy.config import Config
from proxy.lifecycle.fleet import (
    DrainServer,
    FleetMemory,
    Hold,
    Member,
    StartServer,
    needed,
    pick,
    step,
)
from proxy.lifecycle.state import Phase

FLEET = Config(max_servers=3, target_inflight=4, scale_up_after=5, idle_timeout=600)
T = 1000.0  # a monotonic clock's reading
READY = Phase.READY


def ready(name: str, inflight: int = 0, **kw) -> Member:
    return Member(name, READY, inflight, **kw)


@pytest.mark.parametrize("inflight, config, warm, expected", [
    (0, FLEET, False, 0),
    (1, FLEET, False, 1),
    (4, FLEET, False, 1),
    (5, FLEET, False, 2),
    (12, FLEET, False, 3),
    (100, FLEET, False, 3),  # never more than PROXY_MAX_SERVERS
    (0, Config(max_servers=3, min_servers=2), False, 2),  # kept even when idle
    (0, FLEET, True, 1),  # a warm window keeps one
    (9, Config(max_servers=5, target_inflight=2), False, 5),
])
def test_the_fleet_needs_in_flight_over_target_within_min_and_max(inflight, config, warm,
                                                                  expected):
    assert needed(inflight, config, warm) == expected


def test_one_server_at_most_takes_no_fleet_step_whatever_the_load():
    one = Config(max_servers=1)
    chosen, memory = step([ready("gpu", 50)], 50, T, one, FleetMemory(above_since=T - 100))
    assert chosen == Hold() and memory == FleetMemory()


def test_above_target_starts_one_more_only_after_scale_up_after():
    fleet = [ready("gpu", 6)]
    chosen, memory = step(fleet, 6, T, FLEET, FleetMemory())
    assert chosen == Hold() and memory.above_since == T  # above since now: not yet
    chosen, memory = step(fleet, 6, T + 4.9, FLEET, memory)
    assert chosen == Hold()
    chosen, memory = step(fleet, 6, T + 5, FLEET, memory)
    assert chosen == StartServer("gpu-1") and memory.above_since is None


def test_a_dip_below_target_restarts_the_scale_up_wait():
    fleet = [ready("gpu", 6)]
    _, memory = step(fleet, 6, T, FLEET, FleetMemory())
    _, memory = step(fleet, 3, T + 3, FLEET, memory)  # back under target
    assert memory.above_since is None
    chosen, memory = step(fleet, 6, T + 6, FLEET, memory)
    assert chosen == Hold() and memory.above_since == T + 6


def test_one_bring_up_at_a_time():
    fleet = [ready("gpu", 8), ready("gpu-1", 8), Member("gpu-2", Phase.STARTING)]
    chosen, _ = step(fleet, 20, T, Config(max_servers=4, target_inflight=4),
                     FleetMemory(above_since=T - 60))
    assert chosen == Hold()


def test_never_more_servers_than_the_maximum_counting_draining_ones():
    fleet = [ready("gpu", 6), ready("gpu-1", 6), ready("gpu-2", 0, draining=True)]
    chosen, _ = step(fleet, 12, T, FLEET, FleetMemory(above_since=T - 60))
    assert chosen == Hold()


def test_no_start_while_the_budget_or_a_down_forbids_it():
    chosen, _ = step([ready("gpu", 9)], 9, T, FLEET, FleetMemory(above_since=T - 60),
                     may_start=False)
    assert chosen == Hold()


def test_the_first_server_is_the_primarys_not_a_fleet_step():
    chosen, _ = step([Member("gpu", Phase.PROVISIONING)], 9, T, FLEET,
                     FleetMemory(above_since=T - 60))
    assert chosen == Hold()


def test_a_start_takes_the_lowest_free_name():
    fleet = [ready("gpu", 4), ready("gpu-2", 4)]
    chosen, _ = step(fleet, 12, T + 5, FLEET, FleetMemory(above_since=T))
    assert chosen == StartServer("gpu-1")


def test_below_need_for_the_idle_timeout_drains_the_newest_extra():
    fleet = [ready("gpu", 1), ready("gpu-1", 0), ready("gpu-2", 0)]
    chosen, memory = step(fleet, 1, T, FLEET, FleetMemory())
    assert chosen == Hold() and memory.below_since == T
    chosen, memory = step(fleet, 1, T + 599, FLEET, memory)
    assert chosen == Hold()
    chosen, memory = step(fleet, 1, T + 600, FLEET, memory)
    assert chosen == DrainServer("gpu-2", "the fleet needs 1 of its 3 servers")
    assert memory.below_since is None  # the next one waits a whole idle timeout again


def test_the_primary_goes_last_by_its_own_idle_rule():
    chosen, _ = step([ready("gpu", 0)], 0, T, FLEET, FleetMemory(below_since=T - 9999))
    assert chosen == Hold()


def test_an_extra_left_alone_goes_when_idle_even_without_the_primary():
    fleet = [Member("gpu", Phase.ERROR), ready("gpu-1", 0)]
    chosen, _ = step(fleet, 0, T, FLEET, FleetMemory(below_since=T - 600))
    assert chosen == DrainServer("gpu-1", "the fleet needs 0 of its 1 servers")


def test_min_servers_are_kept_when_idle():
    fleet = [ready("gpu"), ready("gpu-1")]
    config = Config(max_servers=3, min_servers=2, idle_timeout=600)
    chosen, memory = step(fleet, 0, T, config, FleetMemory(below_since=T - 9999))
    assert chosen == Hold() and memory.below_since is None


def test_no_drain_while_a_server_comes():
    fleet = [ready("gpu"), ready("gpu-1"), Member("gpu-2", Phase.PROVISIONING)]
    chosen, _ = step(fleet, 0, T, FLEET, FleetMemory(below_since=T - 9999))
    assert chosen == Hold()


def test_requests_go_to_the_ready_server_with_the_fewest_in_flight():
    fleet = [ready("gpu", 3), ready("gpu-1", 1), Member("gpu-2", Phase.STARTING),
             ready("gpu-3", 0, draining=True)]
    assert pick(fleet, {}) == "gpu-1"
    assert pick(fleet, {"gpu-1": 3}) == "gpu"  # this worker's own, not yet reported, count too
    assert pick([ready("gpu", 2), ready("gpu-1", 2)], {}) == "gpu"  # the primary among equals
    assert pick([Member("gpu", Phase.STARTING)], {}) is None


def test_an_operators_up_starts_one_more_at_once_while_there_is_room():
    chosen, _ = step([ready("gpu", 0)], 0, T, FLEET, FleetMemory(), asked=True)
    assert chosen == StartServer("gpu-1")
    full = [ready("gpu"), ready("gpu-1"), ready("gpu-2")]
    assert step(full, 0, T, FLEET, FleetMemory(), asked=True)[0] == Hold()
    coming = [ready("gpu"), Member("gpu-1", Phase.STARTING)]
    assert step(coming, 0, T, FLEET, FleetMemory(), asked=True)[0] == Hold()


def test_a_stopped_server_starts_again_before_a_new_name_is_taken():
    fleet = [ready("gpu", 9), Member("gpu-1", Phase.IDLE), Member("gpu-2", Phase.IDLE)]
    chosen, _ = step(fleet, 9, T + 5, FLEET, FleetMemory(above_since=T))
    assert chosen == StartServer("gpu-1")
