"""Config: env and flags parsed once; a bad value names the variable, the value and the fix."""

import pytest

from proxy.config import Config, ConfigError


def test_defaults_follow_the_contract():
    config = Config.from_env({})
    assert config.provisioner == "exoscale"
    assert config.bind == "127.0.0.1:11434"
    assert (config.workers, config.threads) == (2, 32)
    assert config.idle_timeout == 1800
    assert config.idle_action == "destroy"
    assert config.models == ("llama3.2",)
    assert config.zone == "at-vie-2"
    assert config.instance_type == "gpua5000.small"
    assert config.max_hold == 0
    assert config.api_keys == ()
    assert config.state_dir.is_absolute()


def test_flags_override_the_environment():
    config = Config.from_env({"PROXY_WORKERS": "3"}, PROXY_WORKERS=5, PROXY_BIND=None)
    assert config.workers == 5
    assert config.bind == "127.0.0.1:11434"


def test_idle_timeout_alias_is_accepted_and_proxy_variable_wins():
    assert Config.from_env({"EXOSCALE_IDLE_TIMEOUT": "60"}).idle_timeout == 60
    both = {"EXOSCALE_IDLE_TIMEOUT": "60", "PROXY_IDLE_TIMEOUT": "90"}
    assert Config.from_env(both).idle_timeout == 90


def test_lists_are_comma_separated():
    config = Config.from_env({"OLLAMA_MODEL": "llama3.2, qwen3:8b", "PROXY_API_KEYS": "a,b,"})
    assert config.models == ("llama3.2", "qwen3:8b")
    assert config.api_keys == ("a", "b")


@pytest.mark.parametrize(
    "variable, value, accepted",
    [
        ("PROXY_PROVISIONER", "aws", "exoscale, local"),
        ("PROXY_IDLE_TIMEOUT", "soon", "number"),
        ("PROXY_IDLE_TIMEOUT", "-5", ">= 1"),
        ("PROXY_WORKERS", "2.5", "whole number"),
        ("PROXY_BIND", "localhost", "host:port"),
        ("PROXY_LOCAL_ADDR", "127.0.0.1:99999", "host:port"),
        ("PROXY_STATE_URL", "redis://x", "sqlite:///"),
        ("PROXY_IDLE_ACTION", "hibernate", "destroy, stop"),
        ("OLLAMA_MODEL", "llama 3", "model name"),
    ],
)
def test_a_bad_value_names_variable_value_and_what_is_accepted(variable, value, accepted):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    message = str(caught.value)
    assert variable in message
    assert repr(value.strip()) in message or repr(value.strip().lower()) in message
    assert accepted in message
    assert "\n" not in message
