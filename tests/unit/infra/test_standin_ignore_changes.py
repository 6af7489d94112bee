"""The stand-in's `ignoreChanges`, as Pulumi's engine applies it (pulumi/pulumi
pkg/resource/deploy/step_generator.go `processIgnoreChanges`): an input named takes its old
value, one the old state lacks is dropped, and what the stand-in does not model is refused."""

from __future__ import annotations

import pytest

from tests.doubles.standin_pulumi.cloud import StepError
from tests.doubles.standin_pulumi.engine import _ignore_changes


def test_an_ignored_input_keeps_its_old_value_and_the_rest_change():
    new = {"userData": "new", "labels": {"a": "2"}}
    kept = _ignore_changes(new, {"userData": "old", "labels": {"a": "1"}}, ["userData"])
    assert kept == {"userData": "old", "labels": {"a": "2"}}
    assert new["userData"] == "new"  # the program's inputs are not changed in place


def test_an_ignored_input_the_old_state_lacks_is_dropped():
    assert _ignore_changes({"userData": "new", "zone": "z"}, {"zone": "z"},
                           ["userData"]) == {"zone": "z"}


def test_a_nested_path_is_refused_rather_than_guessed():
    with pytest.raises(StepError, match="top-level inputs only: labels.a"):
        _ignore_changes({"labels": {"a": "2"}}, {"labels": {"a": "1"}}, ["labels.a"])
