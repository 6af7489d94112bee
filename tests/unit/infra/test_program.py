"""The Pulumi program and its settings, with Pulumi's mocks: no CLI, no cloud, no network.

The real SDK classes (pulumi, pulumiverse_exoscale, pulumi_random, pulumi_tls) register their
resources with a mock monitor that records them; property names arrive camelCase, as the
engine would send them, and secret inputs arrive wrapped as secrets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import runpy
from pathlib import Path

import pulumi
import pytest
import yaml
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor

from infra import program
from infra.checks import MIN_DISK_GB
from infra.cloudinit import TLS_SERVER_NAME, decompressed
from infra.settings import Settings, SettingsError

INSTANCE = "exoscale:index/computeInstance:ComputeInstance"
SECURITY_GROUP = "exoscale:index/securityGroup:SecurityGroup"
RULE = "exoscale:index/securityGroupRule:SecurityGroupRule"
VOLUME = "exoscale:index/blockStorageVolume:BlockStorageVolume"
PASSWORD = "random:index/randomPassword:RandomPassword"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
CERT = "tls:index/selfSignedCert:SelfSignedCert"
GET_TEMPLATE = "exoscale:index/getTemplate:getTemplate"

TOKEN = "Tk3n" * 12
PUBLIC_IP = "198.51.100.10"
TEMPLATE_ID = "4a1b2c3d-template"
CERT_PEM = "-----BEGIN CERTIFICATE-----\nQ0VSVA==\n-----END CERTIFICATE-----\n"
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nS0VZ\n-----END PRIVATE KEY-----\n"
MAIN = Path(__file__).resolve().parents[3] / "infra" / "__main__.py"
OUTPUT_NAMES = {
    "remote_url", "public_ip", "instance_id", "token", "tls_certificate", "tls_server_name",
    "instance_type", "zone", "instance_state", "servers",
}


class CloudMocks(pulumi.runtime.Mocks):
    """Records every resource and invoke; answers with the outputs the real providers compute."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.calls: list[pulumi.runtime.MockCallArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        self.resources.append(args)
        computed = {
            PASSWORD: {"result": TOKEN},
            PRIVATE_KEY: {"privateKeyPem": KEY_PEM},
            CERT: {"certPem": CERT_PEM},
            INSTANCE: {"publicIpAddress": PUBLIC_IP},
        }.get(args.typ, {})
        return f"{args.name}-id", {**args.inputs, **computed}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        self.calls.append(args)
        if args.token == GET_TEMPLATE:
            return {"id": TEMPLATE_ID, "name": args.args.get("name"), "zone": args.args.get("zone")}
        raise AssertionError(f"unexpected invoke {args.token}")

    def of_type(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> pulumi.runtime.MockResourceArgs:
        found = self.of_type(typ)
        assert len(found) == 1, f"expected one {typ}, got {len(found)}"
        return found[0]


class RecordingMonitor(MockMonitor):
    """The mock monitor, also keeping the resource options the mocks do not see."""

    def __init__(self, mocks: CloudMocks) -> None:
        super().__init__(mocks)
        mocks.replace_on_changes = {}
        mocks.delete_before_replace = {}

    def RegisterResource(self, request):  # noqa: N802 (the gRPC method's name)
        self.mocks.replace_on_changes[request.name] = list(request.replaceOnChanges)
        self.mocks.delete_before_replace[request.name] = request.deleteBeforeReplace
        return super().RegisterResource(request)


@dataclasses.dataclass
class Run:
    mocks: CloudMocks
    exports: dict  # name -> (value, is_secret)


@pytest.fixture
def run_program(monkeypatch):
    """Runs `declare(settings)` against fresh mocks; returns what it registered and exported."""

    def run(settings: Settings, stack: str = "ollama-exoscale") -> Run:
        mocks = CloudMocks()
        monitor = RecordingMonitor(mocks)
        pulumi.runtime.set_mocks(
            mocks, project="ollama-exoscale", stack=stack, preview=False, monitor=monitor
        )
        exported: dict[str, pulumi.Output] = {}
        monkeypatch.setattr(
            pulumi, "export", lambda name, value: exported.__setitem__(name, value)
        )
        resolved: dict = {}

        async def resolve() -> None:
            for name, value in exported.items():
                output = pulumi.Output.from_input(value)
                resolved[name] = (await output.future(), await output.is_secret())

        @pulumi.runtime.test
        def declare_and_resolve():
            program.declare(settings)
            return pulumi.Output.from_input(asyncio.ensure_future(resolve()))

        declare_and_resolve()  # returns once every registration has finished
        return Run(mocks, resolved)

    return run


def settings(**overrides) -> Settings:
    return Settings(**{"allowed_cidrs": ("203.0.113.7/32",), **overrides})


def plain(value):
    return rpc.unwrap_rpc_secret(value)


# -- the inventory ----------------------------------------------------------------------------


def test_declares_exactly_the_inventory(run_program):
    run = run_program(settings())
    assert sorted(r.typ for r in run.mocks.resources) == sorted(
        [PASSWORD, PRIVATE_KEY, CERT, SECURITY_GROUP, RULE, INSTANCE]
    )
    assert [c.token for c in run.mocks.calls] == [GET_TEMPLATE]


def test_template_is_looked_up_by_name_in_the_zone(run_program):
    run = run_program(settings(zone="ch-gva-2", template="Linux Ubuntu 22.04 LTS 64-bit"))
    call = run.mocks.calls[0]
    assert call.args["zone"] == "ch-gva-2"
    assert call.args["name"] == "Linux Ubuntu 22.04 LTS 64-bit"
    assert call.args["visibility"] == "public"


def test_a_private_template_is_looked_up_among_the_organisations(run_program):
    run = run_program(settings(template="ollama-exoscale-20260101-1200",
                               template_visibility="private"))
    call = run.mocks.calls[0]
    assert (call.args["name"], call.args["visibility"]) == (
        "ollama-exoscale-20260101-1200", "private")


def test_instance_inputs(run_program):
    run = run_program(settings(zone="de-fra-1", instance_type="gpu3080ti.small", disk_size=200))
    instance = run.mocks.one(INSTANCE).inputs
    firewall = run.mocks.one(SECURITY_GROUP)
    assert instance["zone"] == "de-fra-1"
    assert instance["type"] == "gpu3080ti.small"
    assert instance["diskSize"] == 200
    assert instance["templateId"] == TEMPLATE_ID
    assert instance["securityGroupIds"] == [f"{firewall.name}-id"]
    assert instance["name"] == "ollama-exoscale"
    assert "sshKeys" not in instance and "sshKey" not in instance
    assert instance.get("ipv6") is False
    assert instance["state"] == "running"


def test_the_old_instance_goes_before_its_replacement_comes(run_program):
    """A GPU quota of one, and a volume attaches to one instance: delete, then create."""
    run = run_program(settings())
    assert run.mocks.delete_before_replace["gpu"] is True


def test_no_model_volume_unless_asked_for(run_program):
    run = run_program(settings())
    assert run.mocks.of_type(VOLUME) == []
    assert not run.mocks.one(INSTANCE).inputs.get("blockStorageVolumeIds")


def test_a_model_volume_is_attached_and_outlives_an_absent_instance(run_program):
    run = run_program(settings(zone="de-fra-1", model_volume_gb=50))
    volume = run.mocks.one(VOLUME)
    assert volume.inputs["zone"] == "de-fra-1" and volume.inputs["size"] == 50
    assert volume.inputs["name"] == "ollama-exoscale-models"
    assert volume.inputs["labels"]["managed-by"] == "ollama-exoscale"
    assert run.mocks.one(INSTANCE).inputs["blockStorageVolumeIds"] == ["models-id"]
    assert run.exports["model_volume_id"][0] == "models-id"
    gone = run_program(settings(zone="de-fra-1", model_volume_gb=50, instance_state="absent"))
    assert gone.mocks.of_type(INSTANCE) == [] and len(gone.mocks.of_type(VOLUME)) == 1
    assert set(gone.exports) == {"model_volume_id"}  # no endpoint: nothing to forward to


def test_a_stopped_server_is_the_same_instance_declared_stopped(run_program):
    """PROXY_IDLE_ACTION=stop: a declarative state change, not a side call; disk kept."""
    running = run_program(settings(), stack="one").mocks.one(INSTANCE).inputs
    run = run_program(settings(instance_state="stopped"), stack="one")
    stopped = run.mocks.one(INSTANCE).inputs
    assert stopped["state"] == "stopped"
    changed = {k for k in running.keys() | stopped.keys() if running.get(k) != stopped.get(k)}
    assert changed == {"state"}  # the user data, zone, template: nothing that replaces it
    assert run.mocks.replace_on_changes["gpu"] == ["userData"]


def test_new_user_data_replaces_the_instance(run_program):
    """cloud-init runs once per instance: a server must not keep running an old declaration."""
    run = run_program(settings())
    assert run.mocks.replace_on_changes["gpu"] == ["userData"]


def test_labels_mark_the_instance_as_ours_with_its_stack(run_program):
    run = run_program(settings(labels={"team": "ml"}), stack="dev")
    labels = run.mocks.one(INSTANCE).inputs["labels"]
    assert labels == {"team": "ml", "managed-by": "ollama-exoscale", "stack": "dev"}
    assert run.mocks.one(INSTANCE).inputs["name"] == "ollama-exoscale-dev"
    assert run.mocks.one(SECURITY_GROUP).inputs["name"] == "ollama-exoscale-dev"


def test_token_is_long_random_and_plain_characters(run_program):
    token = run_program(settings()).mocks.one(PASSWORD).inputs
    assert token["length"] >= 40
    assert token["special"] is False


def test_tls_certificate_names_the_fixed_server_name(run_program):
    run = run_program(settings())
    key = run.mocks.one(PRIVATE_KEY).inputs
    cert = run.mocks.one(CERT).inputs
    assert (key["algorithm"], key["ecdsaCurve"]) == ("ECDSA", "P256")
    assert cert["dnsNames"] == [TLS_SERVER_NAME]
    assert plain(cert["privateKeyPem"]) == KEY_PEM
    assert "server_auth" in cert["allowedUses"]
    assert cert["validityPeriodHours"] > 24 * 365


# -- the firewall -----------------------------------------------------------------------------


def rules(run: Run) -> list[dict]:
    return [r.inputs for r in run.mocks.of_type(RULE)]


def test_port_open_only_to_the_allowed_networks(run_program):
    run = run_program(settings(allowed_cidrs=("203.0.113.7/32", "198.51.100.0/24"), port=8443))
    firewall = run.mocks.one(SECURITY_GROUP)
    found = rules(run)
    assert sorted(r["cidr"] for r in found) == ["198.51.100.0/24", "203.0.113.7/32"]
    for rule in found:
        assert rule["securityGroupId"] == f"{firewall.name}-id"
        assert (rule["type"], rule["protocol"]) == ("INGRESS", "TCP")
        assert rule["startPort"] == rule["endPort"] == 8443
    assert all(r["cidr"] != "0.0.0.0/0" for r in found)


def test_world_is_open_only_when_asked_for(run_program):
    found = rules(run_program(settings(allowed_cidrs=("0.0.0.0/0",))))
    assert [(r["cidr"], r["startPort"]) for r in found] == [("0.0.0.0/0", 11434)]


def test_no_ssh_rule_unless_key_and_networks_are_given(run_program):
    assert all(r["startPort"] != 22 for r in rules(run_program(settings())))
    run = run_program(settings(ssh_key="ops"))
    assert all(r["startPort"] != 22 for r in rules(run))
    assert run.mocks.one(INSTANCE).inputs["sshKeys"] == ["ops"]


def test_ssh_rule_when_configured(run_program):
    run = run_program(settings(ssh_key="ops", ssh_cidrs=("192.0.2.1/32",)))
    ssh = [r for r in rules(run) if r["startPort"] == 22]
    assert [(r["cidr"], r["endPort"], r["protocol"]) for r in ssh] == [("192.0.2.1/32", 22, "TCP")]
    assert len(rules(run)) == 2  # the port and SSH: nothing else inbound


def test_ipv6_network_gives_the_instance_an_ipv6_address(run_program):
    run = run_program(settings(allowed_cidrs=("2001:db8::/64",)))
    assert run.mocks.one(INSTANCE).inputs["ipv6"] is True
    assert rules(run)[0]["cidr"] == "2001:db8::/64"


# -- the user data ----------------------------------------------------------------------------


def test_user_data_is_a_secret_cloud_config_with_token_and_certificate(run_program):
    run = run_program(settings(models=("llama3.2", "qwen3:8b")))
    user_data = run.mocks.one(INSTANCE).inputs["userData"]
    assert rpc.is_rpc_secret(user_data), "user_data holds the token: it must be a secret"
    text = plain(user_data)
    assert text.startswith("#cloud-config\n")
    files = {f["path"]: decompressed(f) for f in yaml.safe_load(text)["write_files"]}
    assert files["/etc/ollama-exoscale/tls.crt"] == CERT_PEM
    assert files["/etc/ollama-exoscale/tls.key"] == KEY_PEM
    assert f'"Bearer {TOKEN}"' in files["/etc/ollama-exoscale/nginx-site.conf"]
    assert "MODELS=(llama3.2 qwen3:8b)" in files["/usr/local/sbin/ollama-exoscale-setup"]
    assert "{{" not in text, "a placeholder was left unrendered"
    # The token is in the nginx config only: not in the script, whose runs are logged.
    assert [path for path, content in files.items() if TOKEN in content] == [
        "/etc/ollama-exoscale/nginx-site.conf"
    ]


# -- the outputs ------------------------------------------------------------------------------


def test_outputs(run_program):
    run = run_program(settings(zone="ch-gva-2", port=8443))
    assert set(run.exports) == OUTPUT_NAMES
    values = {name: value for name, (value, _) in run.exports.items()}
    assert values["remote_url"] == f"https://{PUBLIC_IP}:8443"
    assert values["public_ip"] == PUBLIC_IP
    assert values["instance_id"] == "gpu-id"
    assert values["token"] == TOKEN
    assert values["tls_certificate"] == CERT_PEM
    assert values["tls_server_name"] == TLS_SERVER_NAME
    assert values["instance_type"] == "gpua5000.small"
    assert values["zone"] == "ch-gva-2"
    assert values["instance_state"] == "running"
    assert values["servers"] == {"gpu": {  # the one server, in the fleet's map too
        "remote_url": f"https://{PUBLIC_IP}:8443", "public_ip": PUBLIC_IP,
        "instance_id": "gpu-id", "instance_state": "running"}}


def test_only_the_token_output_is_secret(run_program):
    run = run_program(settings())
    secret = {name for name, (_, is_secret) in run.exports.items() if is_secret}
    assert secret == {"token"}


def test_programs_in_one_process_do_not_leak_into_each_other(run_program):
    first = run_program(settings(), stack="one")
    second = run_program(settings(allowed_cidrs=("192.0.2.0/24",)), stack="two")
    assert len(first.mocks.resources) == len(second.mocks.resources) == 6
    assert [r["cidr"] for r in rules(second)] == ["192.0.2.0/24"]


# -- settings: bad values stop before any cloud call ------------------------------------------


BASE_ENV = {"EXOSCALE_ALLOWED_CIDRS": "203.0.113.7/32"}


def from_env(**env) -> Settings:
    return Settings.from_env({**BASE_ENV, **env})


def test_defaults_from_an_empty_environment_but_the_cidrs():
    s = from_env()
    assert (s.zone, s.instance_type, s.template) == (
        "at-vie-2", "gpua5000.small", "Linux Ubuntu 24.04 LTS 64-bit"
    )
    assert (s.disk_size, s.models, s.port, s.name) == (100, ("llama3.2",), 11434, "ollama-exoscale")
    assert s.allowed_cidrs == ("203.0.113.7/32",)
    assert (s.ssh_key, s.ssh_cidrs) == (None, ())
    assert s.labels == {"managed-by": "ollama-exoscale"}


def test_environment_is_parsed():
    s = from_env(
        EXOSCALE_ZONE="ch-gva-2", EXOSCALE_INSTANCE_TYPE="gpu3.small", EXOSCALE_DISK_SIZE="250",
        OLLAMA_MODEL="llama3.2, qwen3:8b", EXOSCALE_ALLOWED_CIDRS="203.0.113.7, 198.51.100.0/24",
        EXOSCALE_SSH_KEY="ops", EXOSCALE_SSH_CIDRS="192.0.2.1/32",
        EXOSCALE_LABELS="team=ml,env=dev", EXOSCALE_PORT="8443",
    )
    assert (s.zone, s.instance_type, s.disk_size, s.port) == ("ch-gva-2", "gpu3.small", 250, 8443)
    assert s.models == ("llama3.2", "qwen3:8b")
    assert s.allowed_cidrs == ("203.0.113.7/32", "198.51.100.0/24")
    assert (s.ssh_key, s.ssh_cidrs, s.ssh_enabled) == ("ops", ("192.0.2.1/32",), True)
    assert s.labels == {"team": "ml", "env": "dev", "managed-by": "ollama-exoscale"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EXOSCALE_ZONE": "vienna"},
         "EXOSCALE_ZONE='vienna' is not valid: expected one of Exoscale's zones: at-vie-1, "
         "at-vie-2, bg-sof-1, ch-dk-2, ch-gva-2, de-fra-1, de-muc-1, hr-zag-1"),
        ({"EXOSCALE_DISK_SIZE": "20"},
         f"EXOSCALE_DISK_SIZE=20 is not valid: expected a whole number of GB >= {MIN_DISK_GB}"),
        ({"EXOSCALE_DISK_SIZE": "big"},
         "EXOSCALE_DISK_SIZE='big' is not valid: expected a whole number"),
        ({"OLLAMA_MODEL": ","},
         "OLLAMA_MODEL='' is not valid: expected at least one model name"),
        ({"OLLAMA_MODEL": "llama3.2;reboot"},
         "OLLAMA_MODEL='llama3.2;reboot' is not valid: expected model names like llama3.2"),
        ({"EXOSCALE_ALLOWED_CIDRS": ""},
         "EXOSCALE_ALLOWED_CIDRS='' is not valid: set it to the proxy host's public address, "
         "like 203.0.113.7/32, or explicitly to 0.0.0.0/0 to rely on the token alone"),
        ({"EXOSCALE_ALLOWED_CIDRS": "203.0.113.300/32"},
         "EXOSCALE_ALLOWED_CIDRS='203.0.113.300/32' is not valid: expected IP networks"),
        ({"EXOSCALE_INSTANCE_TYPE": "gpua5000"},
         "EXOSCALE_INSTANCE_TYPE='gpua5000' is not valid: expected family.size"),
        ({"EXOSCALE_PORT": "70000"},
         "EXOSCALE_PORT=70000 is not valid: expected a TCP port between 1 and 65535"),
        ({"EXOSCALE_SSH_CIDRS": "192.0.2.1/32"},
         "EXOSCALE_SSH_CIDRS='192.0.2.1/32' is not valid: SSH is opened only with a key"),
        ({"EXOSCALE_SSH_KEY": "ssh-ed25519 AAAAC3Nz me@host"},
         "EXOSCALE_SSH_KEY='ssh-ed25519 AAAAC3Nz me@host' is not valid: expected the name"),
        ({"EXOSCALE_LABELS": "team"},
         "EXOSCALE_LABELS='team' is not valid: expected key=value pairs"),
    ],
)
def test_bad_environment_fails_with_one_clear_line(env, expected):
    with pytest.raises(SettingsError) as caught:
        from_env(**env)
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_missing_cidrs_is_an_error_not_an_open_port():
    with pytest.raises(SettingsError, match="EXOSCALE_ALLOWED_CIDRS.*203.0.113.7/32.*0.0.0.0/0"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match="allowed_cidrs"):
        Settings()


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"zone": "AT-VIE-2"}, "zone"),
        ({"disk_size": 10}, "disk_size"),
        ({"models": ()}, "models"),
        ({"allowed_cidrs": ()}, "allowed_cidrs"),
        ({"allowed_cidrs": ("not-a-network",)}, "allowed_cidrs"),
        ({"port": 0}, "port"),
        ({"port": 22}, "port"),
        ({"name": "Ollama Exoscale"}, "name"),
        ({"labels": {"bad key": "x"}}, "labels"),
        ({"model_volume_gb": 5}, "model_volume_gb"),
        ({"instance_state": "paused"}, "instance_state"),
    ],
)
def test_bad_settings_name_the_field(overrides, setting):
    with pytest.raises(SettingsError) as caught:
        settings(**overrides)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(f"{setting}=")


def test_settings_are_immutable_and_replace_revalidates():
    s = settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.zone = "ch-gva-2"  # type: ignore[misc]
    assert dataclasses.replace(s, models=("qwen3:8b",)).models == ("qwen3:8b",)
    with pytest.raises(SettingsError, match="models"):
        dataclasses.replace(s, models=())


@pytest.fixture
def stack_config():
    """Sets the stack's configuration, as `pulumi config set` would; cleared afterwards."""
    pulumi.runtime.set_mocks(CloudMocks(), project="ollama-exoscale", stack="dev", preview=False)
    yield lambda **values: pulumi.runtime.set_all_config(
        {f"ollama-exoscale:{key}": value for key, value in values.items()}
    )
    pulumi.runtime.set_all_config({})


def test_stack_config_names_the_config_key(stack_config):
    stack_config(allowedCidrs='["203.0.113.7/32"]', diskSize="40")
    with pytest.raises(SettingsError) as caught:
        Settings.from_pulumi_config()
    assert str(caught.value).startswith("ollama-exoscale:diskSize=40 is not valid")


def test_stack_config_is_read(stack_config):
    stack_config(
        allowedCidrs="203.0.113.7/32", diskSize="60", labels='{"team": "ml"}', models="a,b:1",
        instanceType="gpu3.small", sshKey="ops", sshCidrs="192.0.2.1", port="8443",
    )
    s = Settings.from_pulumi_config()
    assert (s.allowed_cidrs, s.disk_size, s.models) == (("203.0.113.7/32",), 60, ("a", "b:1"))
    assert (s.instance_type, s.ssh_key, s.ssh_cidrs, s.port) == (
        "gpu3.small", "ops", ("192.0.2.1/32",), 8443
    )
    assert s.labels == {"team": "ml", "managed-by": "ollama-exoscale"}


def test_stack_config_without_cidrs_says_what_to_set(stack_config):
    stack_config()
    with pytest.raises(SettingsError, match="^ollama-exoscale:allowedCidrs='' is not valid"):
        Settings.from_pulumi_config()


# -- `pulumi up` at the root: infra/__main__.py -------------------------------------------------


def test_main_stops_on_bad_config_before_declaring_anything(stack_config, capsys):
    mocks = CloudMocks()
    pulumi.runtime.set_mocks(mocks, project="ollama-exoscale", stack="dev", preview=False)
    stack_config(allowedCidrs="203.0.113.7/32", zone="vienna")
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(MAIN), run_name="__main__")
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ollama-exoscale:zone='vienna' is not valid: expected one of "
                          "Exoscale's zones: at-vie-1, ")
    assert err.endswith(", hr-zag-1\n") and err.count("\n") == 1
    assert mocks.resources == [] and mocks.calls == []


def test_main_declares_the_program_from_the_stack_config(stack_config):
    mocks = CloudMocks()
    pulumi.runtime.set_mocks(mocks, project="ollama-exoscale", stack="dev", preview=False)
    stack_config(allowedCidrs="203.0.113.7/32", models="qwen3:8b")

    @pulumi.runtime.test
    def run_main():
        runpy.run_path(str(MAIN), run_name="__main__")

    run_main()
    assert len(mocks.of_type(INSTANCE)) == 1
    assert mocks.one(INSTANCE).inputs["labels"]["stack"] == "dev"
