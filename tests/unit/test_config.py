"""Config: env and flags parsed once; a bad value names the variable, the value and the fix."""

import pytest

from proxy.config import Config, ConfigError


def test_defaults_follow_the_contract():
    config = Config.from_env({})
    assert config.provisioner == "exoscale"
    assert config.bind == "127.0.0.1:11434"
    assert (config.workers, config.max_connections) == (2, 1000)
    assert config.client_timeout == 15.0
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
    config = Config.from_env(
        {"OLLAMA_MODEL": "llama3.2, qwen3:8b", "PROXY_API_KEYS": "key-aaaaaa,key-bbbbbb,"}
    )
    assert config.models == ("llama3.2", "qwen3:8b")
    assert config.api_keys == ("key-aaaaaa", "key-bbbbbb")


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
        ("PROXY_WARM_WINDOWS", "mon-fri 18:00-08:00", "HH:MM-HH:MM"),
        ("PROXY_WARM_WINDOWS", "weekdays 08:00-18:00", "mon-fri"),
        ("PROXY_TIMEZONE", "Mars/Base", "IANA name"),
        ("PROXY_HOURLY_PRICE", "cheap", "number"),
        ("PROXY_DAILY_GPU_HOURS", "-1", ">= 0"),
        ("PROXY_MAX_INSTANCE_HOURS", "forever", "number"),
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


def test_cost_limits_and_warm_windows_are_read_in_the_configured_zone():
    config = Config.from_env({
        "PROXY_HOURLY_PRICE": "1.98", "PROXY_DAILY_GPU_HOURS": "8", "PROXY_CURRENCY": "CHF",
        "PROXY_MAX_INSTANCE_HOURS": "12", "PROXY_WARM_WINDOWS": "mon-fri 08:00-18:00",
        "TZ": "Europe/Vienna",
    })
    assert (config.hourly_price, config.daily_gpu_hours, config.max_instance_hours) == (
        1.98, 8, 12)
    assert config.currency == "CHF" and config.timezone == "Europe/Vienna"
    assert [str(w) for w in config.warm_windows] == ["mon,tue,wed,thu,fri 08:00-18:00"]
    assert Config.from_env({"TZ": "Europe/Vienna", "PROXY_TIMEZONE": "UTC"}).timezone == "UTC"
    unset = Config.from_env({})
    assert (unset.hourly_price, unset.daily_gpu_hours, unset.max_instance_hours) == (0, 0, 0)
    assert unset.warm_windows == () and unset.drain_timeout == 300


def test_keys_file_gives_names_and_admin_rights(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalice alice-key-123456\nops  ops-key-1234567 admin\n\n")
    config = Config.from_env({"PROXY_KEYS_FILE": str(keys), "PROXY_API_KEYS": "env-key-12345"})
    assert config.api_keys == ("env-key-12345", "alice-key-123456")
    assert config.admin_keys == ("ops-key-1234567",)
    assert config.key_names["alice-key-123456"] == "alice"
    assert config.auth_enabled


@pytest.mark.parametrize("content, fragment", [
    ("alice\n", "line 1 is not `NAME KEY [admin]`"),
    ("alice key-1234567 root\n", "line 1"),
    ("alice short\n", "shorter than 8 characters"),
])
def test_a_bad_keys_file_is_a_one_line_error_without_the_key(tmp_path, content, fragment):
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"PROXY_KEYS_FILE": str(keys)})
    assert fragment in str(caught.value)
    assert "short\n" not in str(caught.value) and "'short'" not in str(caught.value)


def test_a_missing_keys_file_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="PROXY_KEYS_FILE=.*cannot be read"):
        Config.from_env({"PROXY_KEYS_FILE": str(tmp_path / "nope")})


@pytest.mark.parametrize("variable", ["PROXY_MAX_BODY_MB", "PROXY_MAX_BLOB_GB", "PROXY_WORKERS"])
def test_a_huge_number_is_a_one_line_error_not_a_traceback(variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: "1e308" if variable != "PROXY_WORKERS" else "9" * 30})
    assert variable in str(caught.value) and "<= 1e+12" in str(caught.value)


def test_proxy_threads_is_read_and_checked():
    assert Config.from_env({"PROXY_THREADS": "7"}).threads == 7
    assert Config.from_env({}).threads == 32
    with pytest.raises(ConfigError, match="PROXY_THREADS"):
        Config.from_env({"PROXY_THREADS": "0"})
