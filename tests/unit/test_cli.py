"""The command line: help that lists every flag, and one clear line for a bad setting."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness.mirror import proxy_command

from proxy.cli import main

FLAGS = ["--config", "--listen", "--upstream", "--cache-dir", "--cache-max-size", "--log-level"]


def run_proxy(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # A clean environment: no REGISTRY_PROXY_* leaking in from the shell running the tests.
    base = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_PROXY_")}
    return subprocess.run(
        proxy_command(*args),
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help_exits_zero(args: list[str]) -> None:
    result = run_proxy(*args)
    assert result.returncode == 0, result.stderr
    assert "usage: registry-proxy" in result.stdout
    assert result.stderr == ""


def test_the_top_level_help_names_the_serve_command() -> None:
    assert "serve" in run_proxy("--help").stdout


def test_serve_help_mentions_every_flag() -> None:
    help_text = run_proxy("serve", "--help").stdout
    missing = [flag for flag in FLAGS if flag not in help_text]
    assert missing == []
    assert "REGISTRY_PROXY_" in help_text


def _assert_one_line_naming(result: subprocess.CompletedProcess[str], setting: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert setting in lines[0]
    assert lines[0].startswith("registry-proxy: ")


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--cache-max-size", "lots"], "cache_max_size"),
        (["--upstream", "ftp://x"], "upstream"),
        (["--listen", "nope"], "listen"),
        (["--config", "/nonexistent/proxy.toml"], "config"),
        (["--log-level", "loud"], "log_level"),
        (["--connect-timeout", "nan"], "connect_timeout"),
    ],
)
def test_a_bad_flag_exits_non_zero_with_one_line_naming_the_setting(
    args: list[str], setting: str
) -> None:
    _assert_one_line_naming(run_proxy("serve", *args), setting)


def test_an_unknown_key_in_the_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('cache_max_size = "1GiB"\ncolour = "blue"\n')
    _assert_one_line_naming(run_proxy("serve", "--config", str(config)), "colour")


def test_a_config_file_that_is_not_utf8_is_one_line_naming_the_config(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_bytes(b'log_level = "\xff"\n')
    _assert_one_line_naming(run_proxy("serve", "--config", str(config)), "config")


def test_a_bad_setting_in_the_environment_is_one_line_naming_it() -> None:
    result = run_proxy("serve", env={"REGISTRY_PROXY_CACHE_MAX_SIZE": "bad"})
    _assert_one_line_naming(result, "cache_max_size")


def test_a_flag_is_checked_even_when_the_environment_is_valid() -> None:
    result = run_proxy("serve", "--listen", "nope", env={"REGISTRY_PROXY_CACHE_MAX_SIZE": "1GiB"})
    _assert_one_line_naming(result, "listen")


def test_the_entry_point_returns_2_on_a_bad_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("REGISTRY_PROXY_")]:
        monkeypatch.delenv(name)
    assert main(["serve", "--cache-max-size", "lots"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "cache_max_size" in captured.err
    assert "'lots'" in captured.err


def test_the_entry_point_reads_a_bad_environment_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_LISTEN", "nope")
    assert main(["serve"]) == 2
    assert "listen" in capsys.readouterr().err


def test_the_entry_point_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main([])
    assert raised.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err
