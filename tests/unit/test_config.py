"""Settings: defaults < TOML file < environment < flags, every value validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from proxy.config import ConfigError, Secret, Settings, UpstreamSettings
from proxy.config.load import load_settings
from proxy.config.values import parse_size

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_settings(config_file, environ, flags)
    return raised.value


# --- Defaults and precedence ----------------------------------------------------------------


def test_no_file_environment_or_flags_gives_the_defaults_mirroring_docker_hub() -> None:
    settings = load_settings(None, environ=NO_ENV, flags={})
    assert settings == Settings(
        upstreams=(UpstreamSettings(name="docker.io", url=URL("https://registry-1.docker.io")),)
    )
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 5000)
    assert settings.cache_max_size == 50 * 1024**3
    assert settings.default_upstream.is_docker_hub


def test_the_file_overrides_defaults_the_environment_the_file_and_flags_everything(
    tmp_path: Path,
) -> None:
    config = write(
        tmp_path,
        'listen = "127.0.0.1:6000"\n'
        'cache_dir = "/from/file"\n'
        'cache_max_size = "1GiB"\n'
        'log_level = "debug"\n'
        "read_timeout = 7\n",
    )
    environ = {
        "REGISTRY_PROXY_CACHE_MAX_SIZE": "2GiB",
        "REGISTRY_PROXY_LOG_LEVEL": "warning",
        "REGISTRY_PROXY_CACHE_DIR": "/from/env",
    }
    flags = {"log_level": "error", "cache_dir": None}
    settings = load_settings(config, environ=environ, flags=flags)
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 6000)  # file
    assert settings.read_timeout == 7.0  # file
    assert settings.cache_max_size == 2 * 1024**3  # environment over file
    assert settings.cache_dir == Path("/from/env")  # environment; a None flag is not set
    assert settings.log_level == "error"  # flag over environment
    assert settings.connect_timeout == 5.0  # default


def test_the_environment_is_read_from_the_process_when_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("REGISTRY_PROXY_UPSTREAM", "https://ghcr.io")
    settings = load_settings()
    assert settings.listen_port == 7000
    assert settings.default_upstream.name == "ghcr.io"


def test_unrelated_environment_variables_are_ignored() -> None:
    settings = load_settings(environ={"REGISTRY_PROXY_NONSENSE": "x", "CACHE_MAX_SIZE": "bad"})
    assert settings.cache_max_size == 50 * 1024**3


# --- Sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 * 1024**3),
        ("500MB", 500 * 1000**2),
        ("1G", 1024**3),
        ("1g", 1024**3),
        ("1048576", 1048576),
        ("1.5KiB", 1536),
        ("2 TB", 2 * 1000**4),
        ("10b", 10),
        (" 7 ", 7),
        # Exact integer arithmetic: no float rounding and no overflow for absurd values.
        ("9007199254740993", 9007199254740993),
        pytest.param("9" * 400, int("9" * 400), id="400-digit-bytes"),
    ],
)
def test_a_size_takes_binary_and_decimal_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "lots", "GiB", "-1", "0", "0GiB", "0.1", "1.5XB", "1e9", "1,5G"]
)
def test_a_bad_size_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|zero"):
        parse_size(text)


@given(st.text(max_size=30) | st.text(alphabet="0123456789.kKmMgGtTiIbB -e", max_size=30))
@example("9" * 400 + "TiB")
@example("1e400")
def test_any_size_text_is_a_positive_size_or_a_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert isinstance(size, int)
    assert size > 0


# --- Invalid settings name themselves -------------------------------------------------------


def test_an_unknown_key_in_the_file_is_an_error_naming_it(tmp_path: Path) -> None:
    error = config_error(config_file=write(tmp_path, 'cache_max_sise = "1G"\n'), environ=NO_ENV)
    assert error.setting == "cache_max_sise"
    assert "cache_max_sise" in str(error)


def test_an_unknown_flag_is_an_error_naming_it() -> None:
    assert config_error(environ=NO_ENV, flags={"colour": "blue"}).setting == "colour"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "not a url",
        "https://",
        "https://registry.example?x=1",
        "http://a#b",
        "http://[::1",
    ],
)
def test_an_upstream_that_is_not_an_http_url_is_an_error(url: str) -> None:
    assert config_error(environ=NO_ENV, flags={"upstream": url}).setting == "upstream"


@pytest.mark.parametrize("listen", ["nope", "host:", "host:0", "host:65536", "host:http", "5000"])
def test_a_listen_address_that_is_not_host_and_port_is_an_error(listen: str) -> None:
    assert config_error(environ=NO_ENV, flags={"listen": listen}).setting == "listen"


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        (":5001", "0.0.0.0", 5001),
        ("[::1]:5002", "::1", 5002),
    ],
)
def test_a_listen_address_is_split_into_host_and_port(listen: str, host: str, port: int) -> None:
    settings = load_settings(environ={"REGISTRY_PROXY_LISTEN": listen})
    assert (settings.listen_host, settings.listen_port) == (host, port)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cache_max_size", "bad"),
        ("log_level", "loud"),
        ("connect_timeout", "0"),
        ("read_timeout", "-1"),
        ("download_timeout", "soon"),
        # float() accepts these, a timeout must not.
        ("connect_timeout", "nan"),
        ("read_timeout", "inf"),
        ("parallel_download_below", "0"),
        ("parallel_download_probe", "soon"),
    ],
)
def test_a_bad_value_from_the_environment_is_an_error_naming_the_setting(
    key: str, value: str
) -> None:
    error = config_error(environ={f"REGISTRY_PROXY_{key.upper()}": value})
    assert error.setting == key
    assert key in str(error)


def test_a_log_level_is_case_insensitive_and_timeouts_may_be_fractional() -> None:
    settings = load_settings(environ=NO_ENV, flags={"log_level": "DEBUG", "connect_timeout": "0.5"})
    assert settings.log_level == "debug"
    assert settings.connect_timeout == 0.5


def test_a_large_blob_splits_after_a_probe_below_a_rate_or_at_once_with_a_probe_of_zero() -> None:
    defaults = load_settings(environ=NO_ENV)
    assert (defaults.parallel_download_probe, defaults.parallel_download_below) == (0.5, 64 << 20)
    settings = load_settings(
        environ={
            "REGISTRY_PROXY_PARALLEL_DOWNLOAD_PROBE": "0",
            "REGISTRY_PROXY_PARALLEL_DOWNLOAD_BELOW": "10MiB",
        }
    )
    assert (settings.parallel_download_probe, settings.parallel_download_below) == (0, 10 << 20)


def test_toml_numbers_are_accepted_where_a_number_is_meant(tmp_path: Path) -> None:
    config = write(tmp_path, "cache_max_size = 1048576\nconnect_timeout = 2.5\n")
    settings = load_settings(config, environ=NO_ENV)
    assert (settings.cache_max_size, settings.connect_timeout) == (1048576, 2.5)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("cache_max_size = true\n", "cache_max_size"),
        ("listen = [1, 2]\n", "listen"),
        ("log_level = 1979-05-27\n", "log_level"),
        ("[cache]\nmax_size = 1\n", "cache"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_an_error_naming_it(
    tmp_path: Path, text: str, key: str
) -> None:
    assert config_error(config_file=write(tmp_path, text), environ=NO_ENV).setting == key


# --- The file itself ------------------------------------------------------------------------


def test_a_missing_config_file_is_an_error_naming_the_config(tmp_path: Path) -> None:
    error = config_error(config_file=tmp_path / "absent.toml", environ=NO_ENV)
    assert error.setting == "config"
    assert "absent.toml" in str(error)


def test_a_config_file_that_cannot_be_read_is_an_error_naming_the_config(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (for whom chmod 000 changes nothing).
    assert config_error(config_file=tmp_path, environ=NO_ENV).setting == "config"


@pytest.mark.parametrize("content", [b"listen = \n", b"[[upstreams]\n", b"a = 1\na = 2\n"])
def test_invalid_toml_is_an_error_naming_the_config(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    error = config_error(config_file=path, environ=NO_ENV)
    assert error.setting == "config"
    assert "TOML" in str(error)


def test_a_config_file_that_is_not_utf8_is_an_error_naming_the_config(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'log_level = "d\xe9bug"\n')
    assert config_error(config_file=path, environ=NO_ENV).setting == "config"


# --- Upstream tables ------------------------------------------------------------------------


def test_upstream_tables_replace_the_default_and_are_named_by_their_host(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "[[upstreams]]\n"
        'url = "https://registry-1.docker.io/"\n'
        "[[upstreams]]\n"
        'url = "https://ghcr.io"\n'
        "[[upstreams]]\n"
        'url = "http://registry.lan:5000"\n'
        "[[upstreams]]\n"
        'name = "quay"\n'
        'url = "https://quay.io"\n',
    )
    upstreams = load_settings(config, environ=NO_ENV).upstreams
    assert [u.name for u in upstreams] == ["docker.io", "ghcr.io", "registry.lan:5000", "quay"]
    assert upstreams[0].url == URL("https://registry-1.docker.io")
    assert upstreams[0].is_docker_hub
    assert not upstreams[1].is_docker_hub


def test_an_upstream_setting_comes_first_before_the_tables(tmp_path: Path) -> None:
    config = write(tmp_path, '[[upstreams]]\nurl = "https://ghcr.io"\n')
    settings = load_settings(config, environ={"REGISTRY_PROXY_UPSTREAM": "https://quay.io"})
    assert [u.name for u in settings.upstreams] == ["quay.io", "ghcr.io"]
    assert settings.default_upstream.name == "quay.io"


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ('[[upstreams]]\nurl = "https://ghcr.io"\nmirror = true\n', "upstreams[0].mirror"),
        ('[[upstreams]]\nname = "x"\n', "upstreams[0].url"),
        ('[[upstreams]]\nurl = "ftp://ghcr.io"\n', "upstreams[0].url"),
        (
            '[[upstreams]]\nurl = "https://a.io"\n[[upstreams]]\nurl = "https://b.io"\nx = 1\n',
            "upstreams[1].x",
        ),
        ('upstreams = ["https://ghcr.io"]\n', "upstreams[0]"),
        (
            '[[upstreams]]\nurl = "https://ghcr.io"\n[[upstreams]]\nurl = "https://ghcr.io/"\n',
            "upstreams",
        ),
        (
            '[[upstreams]]\nurl = "https://index.docker.io"\n'
            '[[upstreams]]\nurl = "https://registry-1.docker.io"\n',
            "upstreams",
        ),
    ],
)
def test_a_bad_upstream_table_is_an_error_naming_it(
    tmp_path: Path, text: str, setting: str
) -> None:
    assert config_error(config_file=write(tmp_path, text), environ=NO_ENV).setting == setting


# --- Secrets --------------------------------------------------------------------------------

PASSWORD = "hunter2-s3cret-token"


def _assert_hidden(settings: Settings) -> None:
    for text in (repr(settings), str(settings), repr(settings.upstreams), str(settings.upstreams)):
        assert PASSWORD not in text
    assert "***" in repr(settings)


def test_a_password_file_is_read_and_never_shown(tmp_path: Path) -> None:
    password_file = write(tmp_path, f"{PASSWORD}\n", name="password")
    config = write(
        tmp_path,
        "[[upstreams]]\n"
        'url = "https://ghcr.io"\n'
        'username = "me"\n'
        f'password_file = "{password_file}"\n',
    )
    settings = load_settings(config, environ=NO_ENV)
    upstream = settings.default_upstream
    assert upstream.username == "me"
    assert upstream.password is not None
    assert upstream.password.reveal() == PASSWORD  # stripped of its newline
    _assert_hidden(settings)


def test_the_upstream_password_file_flag_is_read_and_never_shown(tmp_path: Path) -> None:
    password_file = write(tmp_path, PASSWORD, name="password")
    settings = load_settings(
        environ=NO_ENV,
        flags={"upstream_username": "me", "upstream_password_file": str(password_file)},
    )
    assert settings.default_upstream.password == Secret(PASSWORD)
    assert settings.default_upstream.username == "me"
    _assert_hidden(settings)


def test_a_password_from_the_environment_is_never_shown() -> None:
    settings = load_settings(environ={"REGISTRY_PROXY_UPSTREAM_PASSWORD": PASSWORD})
    assert settings.default_upstream.password == Secret(PASSWORD)
    _assert_hidden(settings)


def test_an_empty_password_file_means_no_password(tmp_path: Path) -> None:
    password_file = write(tmp_path, "\n", name="password")
    settings = load_settings(environ=NO_ENV, flags={"upstream_password_file": str(password_file)})
    assert settings.default_upstream.password is None


def test_a_missing_password_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    error = config_error(environ=NO_ENV, flags={"upstream_password_file": missing})
    assert error.setting == "upstream_password_file"
    config = write(
        tmp_path, f'[[upstreams]]\nurl = "https://ghcr.io"\npassword_file = "{missing}"\n'
    )
    assert config_error(config_file=config, environ=NO_ENV).setting == "upstreams[0].password_file"


def test_a_secret_hides_itself_but_compares_by_value() -> None:
    secret = Secret(PASSWORD)
    assert PASSWORD not in repr(secret)
    assert PASSWORD not in str(secret)
    assert PASSWORD not in f"{secret}"
    assert secret == Secret(PASSWORD)
    assert secret != Secret("other")
    assert secret != PASSWORD
    assert hash(secret) == hash(Secret(PASSWORD))
