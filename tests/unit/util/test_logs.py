"""Log lines: JSON when asked, and never a registered secret."""

from __future__ import annotations

import io
import json
import logging

import pytest

from proxy.util import logs


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    root = logging.getLogger("ollama_exoscale")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logs.setup_logging("info", fmt)
    stream = io.StringIO()
    root.handlers[0].setStream(stream)
    return logging.getLogger("ollama_exoscale.test"), stream


def test_json_lines_parse_and_carry_level_logger_and_message():
    log, stream = capture("json")
    log.warning("phase %s → %s", "ready", "destroying")
    line = json.loads(stream.getvalue())
    assert line["level"] == "warning" and line["logger"] == "ollama_exoscale.test"
    assert line["message"] == "phase ready → destroying"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_registered_secrets_are_redacted_in_messages_args_and_tracebacks(fmt):
    log, stream = capture(fmt)
    logs.register_secrets(["sekret-token-123", None, "abc"])
    log.info("calling with %s", "Bearer sekret-token-123")
    log.info("the alphabet begins abc")
    try:
        raise RuntimeError("failed with sekret-token-123")
    except RuntimeError:
        log.exception("boom")
    text = stream.getvalue()
    assert "sekret-token-123" not in text
    assert text.count("[secret]") >= 2
    assert "the alphabet begins abc" in text  # too short to be taken for a secret


def teardown_module():
    root = logging.getLogger("ollama_exoscale")
    for handler in list(root.handlers):
        root.removeHandler(handler)
