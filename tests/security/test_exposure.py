"""The smaller ways a mirror gives away more than it should (issue 18, finding 7): a table any
client can fill, an admin API open to the network, credentials in a logged URL, a metrics label
any client can invent, and a probe any client can make the mirror send to every upstream."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakeupstream import FakeUpstreamServer
from harness.mirror import StartMirror
from yarl import URL

from proxy import cli
from proxy.config import ConfigError, Settings, UpstreamSettings
from proxy.config.load import load_settings
from proxy.errors import RegistryError
from proxy.server import keys as state
from proxy.upstream.routing import DYNAMIC_IDLE, MAX_DYNAMIC_UPSTREAMS, Upstreams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def any_registry_upstreams(clock: Clock) -> Upstreams:
    settings = Settings(
        upstreams=(UpstreamSettings("docker.io", URL("https://registry-1.docker.io")),),
        allow_any_registry=True,
    )
    return Upstreams(settings, clock=clock)


async def test_junk_ns_values_do_not_fill_the_dynamic_table_for_good() -> None:
    clock = Clock()
    upstreams = any_registry_upstreams(clock)
    for index in range(MAX_DYNAMIC_UPSTREAMS):
        upstreams.route("x/tags/list", f"junk{index}.example")
    assert len(list(upstreams)) == 1 + MAX_DYNAMIC_UPSTREAMS
    with pytest.raises(RegistryError):  # all of them were used a moment ago
        upstreams.route("x/tags/list", "real.example")
    clock.now += DYNAMIC_IDLE
    upstream, _ = upstreams.route("x/tags/list", "real.example")
    assert upstream.name == "real.example"
    assert len(list(upstreams)) == 1 + MAX_DYNAMIC_UPSTREAMS
    assert upstreams.get("junk0.example") is None  # the least recently used went first
    await upstreams.close()


async def test_a_dynamic_upstream_with_a_download_running_is_not_evicted() -> None:
    clock = Clock()
    upstreams = any_registry_upstreams(clock)
    busy, _ = upstreams.route("x/tags/list", "busy.example")
    await busy.download_slots[-1].acquire()  # as an open blob stream holds it
    for index in range(MAX_DYNAMIC_UPSTREAMS - 1):
        upstreams.route("x/tags/list", f"junk{index}.example")
    clock.now += DYNAMIC_IDLE
    upstreams.route("x/tags/list", "real.example")
    assert upstreams.get("busy.example") is busy
    assert upstreams.get("junk0.example") is None
    busy.download_slots[-1].release()
    await upstreams.close()


@pytest.mark.parametrize("address", ["0.0.0.0:9000", "192.168.1.10:9000", "[::]:9000"])
def test_an_admin_api_without_a_token_on_a_network_address_is_refused(address: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(environ={}, flags={"admin_listen": address})
    assert error.value.setting == "admin_token_file"


@pytest.mark.parametrize("address", ["127.0.0.1:9000", "localhost:9000", "[::1]:9000"])
def test_an_admin_api_without_a_token_on_loopback_is_allowed(address: str) -> None:
    assert load_settings(environ={}, flags={"admin_listen": address}).admin_listen is not None


def test_serve_refuses_an_open_admin_api_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.serve, "run", lambda settings: pytest.fail("it served"))
    assert cli.main(["serve", "--admin-listen", "0.0.0.0:9000"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "admin_token_file" in err


def test_credentials_in_an_upstream_url_are_refused_without_repeating_them(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(environ={}, flags={"upstream": "https://bob:hunter2@registry.example"})
    assert "hunter2" not in str(error.value)
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nurl = "https://bob:hunter2@registry.example"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config, environ={})
    assert "hunter2" not in str(error.value)


async def test_an_invented_request_method_is_counted_as_other(mirror: StartMirror) -> None:
    client = await mirror()
    for method in ("PROPFIND", "GET"):  # a WebDAV method: the HTTP parser lets it through
        await (await client.request(method, "/v2/")).read()
    registry = client.app[state.METRICS].registry
    name = "registry_proxy_http_request_duration_seconds_count"
    labels = {"route": "ping", "method": "PROPFIND", "status_class": "4xx", "cache": "error"}
    assert registry.get_sample_value(name, labels) is None
    assert registry.get_sample_value(name, {**labels, "method": "other"}) == 1
    ok = {"route": "ping", "method": "GET", "status_class": "2xx", "cache": "pass"}
    assert registry.get_sample_value(name, ok) == 1


async def test_clients_cannot_make_the_mirror_probe_its_upstreams_at_will(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror()
    for _ in range(5):
        response = await client.get("/readyz?upstream=1")
        body = await response.json()
        assert body["checks"]["upstream fake"] == "ok"
    assert fake_upstream.registry.count(path_contains="/v2/") == 1


async def test_readiness_probes_only_the_configured_upstreams(
    mirror: StartMirror, fake_upstream: FakeUpstreamServer
) -> None:
    client = await mirror(allow_any_registry=True)
    client.app[state.UPSTREAMS].route("x/tags/list", "registry.example")
    body = await (await client.get("/readyz?upstream=1")).json()
    assert [check for check in body["checks"] if check.startswith("upstream")] == ["upstream fake"]
