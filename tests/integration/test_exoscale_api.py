"""The real `exoscale` client (exoscale.api.v2.Client) against the API v2 stand-in
(tests/doubles/exoscale_api.py), and proxy/provision/bake.py's TemplateBaker on top of it:
each operation bake uses, the shapes it reads, and what the API refuses."""

from __future__ import annotations

import json
import uuid

import pytest
from exoscale.api.exceptions import ExoscaleAPIAuthException, ExoscaleAPIClientException
from exoscale.api.v2 import Client

from proxy.provision.bake import TemplateBaker, template_name
from proxy.provision.base import ProvisionError
from tests.doubles.exoscale_api import ExoscaleApi
from tests.doubles.standin_pulumi.cloud import Cloud

KEY, SECRET = "EXOapitestkey0123", "api-test-secret-0123456789"


@pytest.fixture
def api(tmp_path):
    with ExoscaleApi(tmp_path, KEY, SECRET) as served:
        yield served


def an_instance(tmp_path, state: str = "running") -> str:
    """An instance in the simulated cloud, on a disk with what the install stages left."""
    disk = tmp_path / "disk"
    (disk / "standin-installed").mkdir(parents=True)
    (disk / "standin-installed" / "driver").touch()
    instance_id = str(uuid.uuid4())
    with Cloud(tmp_path, {}).objects() as data:
        data["instances"][instance_id] = {
            "name": "ollama-exoscale", "zone": "at-vie-2", "type": "gpua5000.small",
            "diskSize": 100, "templateId": str(uuid.uuid4()), "state": state,
            "disk": str(disk), "pid": None,
        }
    return instance_id


def client(api: ExoscaleApi, secret: str = SECRET) -> Client:
    return Client(KEY, secret, url=api.url)


def test_bake_stops_snapshots_and_promotes_with_the_source_templates_user(api, tmp_path):
    instance_id = an_instance(tmp_path)
    steps: list[str] = []
    template = TemplateBaker(client(api), "at-vie-2").bake(instance_id, "ollama-exoscale-x",
                                                            steps.append)
    assert api.calls == ["get-instance", "stop-instance", "get-operation", "create-snapshot",
                         "get-operation", "promote-snapshot-to-template", "get-operation",
                         "get-template"]
    assert (template.name, template.zone, template.default_user) == (
        "ollama-exoscale-x", "at-vie-2", "ubuntu")
    assert any("snapshot" in step for step in steps)
    cloud = json.loads((tmp_path / "standin-cloud.json").read_text())
    assert cloud["instances"][instance_id]["state"] == "stopped"
    baked = cloud["templates"][template.id]
    assert (tmp_path / baked["disk"] / "standin-installed" / "driver").exists()


def test_a_stopped_instance_is_snapshotted_without_a_stop(tmp_path):
    with ExoscaleApi(tmp_path, KEY, SECRET, pending_polls=0) as api:
        instance_id = an_instance(tmp_path, state="stopped")
        TemplateBaker(client(api), "at-vie-2").bake(instance_id, "t", lambda s: None)
        assert "stop-instance" not in api.calls  # stopped already: not stopped again


@pytest.mark.slow
def test_client_wait_polls_until_the_operation_succeeds(tmp_path):
    with ExoscaleApi(tmp_path, KEY, SECRET, pending_polls=1) as api:
        instance_id = an_instance(tmp_path)
        operation = client(api).create_snapshot(id=instance_id)
        assert operation["state"] == "pending"
        done = client(api).wait(operation["id"])
        assert done["state"] == "success" and done["reference"]["command"] == "get-snapshot"
        assert api.calls.count("get-operation") == 2


def test_stopping_a_stopped_instance_is_refused_as_the_api_does(api, tmp_path):
    instance_id = an_instance(tmp_path, state="stopped")
    with pytest.raises(ExoscaleAPIClientException, match="Only running instances can be stopped"):
        client(api).stop_instance(id=instance_id)


def test_a_wrong_secret_is_403_and_the_bakers_error_names_the_settings_not_the_secret(
        api, tmp_path):
    instance_id = an_instance(tmp_path)
    with pytest.raises(ExoscaleAPIAuthException):
        client(api, secret="wrong-secret-value").get_instance(id=instance_id)
    with pytest.raises(ProvisionError) as caught:
        TemplateBaker(client(api, "wrong-secret-value"), "at-vie-2").bake(
            instance_id, "t", lambda s: None)
    message = str(caught.value)
    assert "403" in message and "EXOSCALE_API_SECRET" in message
    assert "wrong-secret-value" not in message and SECRET not in message


def test_unsigned_and_expired_requests_are_refused(api, tmp_path):
    import requests

    answer = requests.get(api.url + f"/instance/{an_instance(tmp_path)}", timeout=5)
    assert answer.status_code == 403
    expired = requests.get(api.url + "/template", timeout=5, headers={
        "Authorization": f"EXO2-HMAC-SHA256 credential={KEY},expires=1,signature=x"})
    assert expired.status_code == 403


def test_unknown_ids_are_404_and_errors_are_scrubbed(api):
    with pytest.raises(ProvisionError) as caught:
        TemplateBaker(client(api), "at-vie-2").bake(str(uuid.uuid4()), "t", lambda s: None)
    assert "404" in str(caught.value) and "not found" in str(caught.value)


def test_promote_needs_a_name(api, tmp_path):
    snapshot = client(api).create_snapshot(id=an_instance(tmp_path))["reference"]["id"]
    with pytest.raises(ExoscaleAPIClientException, match="name"):
        client(api).promote_snapshot_to_template(id=snapshot, default_user="ubuntu")


def test_a_template_is_listed_copied_to_another_zone_and_deleted(api, tmp_path):
    template = TemplateBaker(client(api), "at-vie-2").bake(an_instance(tmp_path), "baked",
                                                           lambda s: None)
    listed = client(api).list_templates(visibility="private")["templates"]
    assert [(t["name"], t["visibility"], t["default-user"]) for t in listed] == [
        ("baked", "private", "ubuntu")]
    assert client(api).list_templates(visibility="public")["templates"] == []
    with pytest.raises(ExoscaleAPIClientException, match="target-zone"):
        client(api).copy_template(id=template.id, target_zone="mars-1")
    client(api).wait(client(api).copy_template(id=template.id, target_zone="de-fra-1")["id"])
    assert client(api).get_template(id=template.id)["zones"] == ["at-vie-2", "de-fra-1"]
    client(api).wait(client(api).delete_template(id=template.id)["id"])
    assert client(api).list_templates(visibility="private")["templates"] == []


def test_the_bakers_template_name_carries_the_date():
    from datetime import datetime, timezone

    assert template_name(datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)) == (
        "ollama-exoscale-20260102-0304")


def test_removing_the_instance_as_destroy_does_leaves_the_template(api, tmp_path):
    """`down` runs `pulumi destroy` (or `up` without the instance): the provider deletes the
    stack's objects only; a template is none of them."""
    from tests.doubles.standin_pulumi.cloud import INSTANCE

    instance_id = an_instance(tmp_path)
    template = TemplateBaker(client(api), "at-vie-2").bake(instance_id, "kept", lambda s: None)
    Cloud(tmp_path, {}).delete(INSTANCE, instance_id)
    assert client(api).get_template(id=template.id)["name"] == "kept"
    assert not (tmp_path / "disk").exists()  # the instance's disk went; the template's copy not
