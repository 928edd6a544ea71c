"""Every real client that runs here pulls through the mirror configured *as a mirror*.

The image references name the real registries (``docker.io/library/<name>``, ``ghcr.io/...``,
or a bare ``<name>`` for Docker), never the mirror: each client finds the mirror through the
configuration the README documents (``registries.conf``, ``hosts.toml``, ``daemon.json``). The
real Docker Hub is unreachable (a dead HTTP(S) proxy), so an image that arrives came through the
mirror, and the recording forwarder in front of the mirror shows which paths the client sent.
Where the client can run containers, the pulled image runs and prints ``hello``.

The ``ghcr.io`` tests need multi-upstream routing in the mirror (``?ns=`` and path prefixes).
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.mirror import Mirror
from harness.processes import Distribution
from harness.skopeo import skopeo_copy
from harness.verify import DIR_MANIFEST, verify_dir

from .conftest import Publish
from .daemons import Containerd, Dockerd, podman_env, run
from .images import GREETING
from .recorder import RecordingForwarder

pytestmark = pytest.mark.clients

# README "podman, buildah, skopeo and CRI-O": the mirror for docker.io (the mirror's default
# upstream) and a path prefix for every other registry.
REGISTRIES_CONF = """\
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "registry-1.docker.io"

[[registry.mirror]]
location = "{mirror}"
insecure = true

[[registry]]
prefix = "ghcr.io"
location = "ghcr.io"

[[registry.mirror]]
location = "{mirror}/ghcr.io"
insecure = true
"""

# README "containerd": one hosts.toml per registry, under the directory named after it.
HOSTS_TOML = """\
server = "{server}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "1s"
"""
SERVERS = {"docker.io": "https://registry-1.docker.io", "ghcr.io": "https://ghcr.io"}

CTR_SNAPSHOTTER = "native"  # works on any filesystem; overlayfs may not here


def write_registries_conf(directory: Path, forwarder: RecordingForwarder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "registries.conf"
    path.write_text(REGISTRIES_CONF.format(mirror=forwarder.host))
    return path


def write_hosts_dir(directory: Path, forwarder: RecordingForwarder) -> Path:
    for registry, server in SERVERS.items():
        (directory / registry).mkdir(parents=True, exist_ok=True)
        (directory / registry / "hosts.toml").write_text(
            HOSTS_TOML.format(server=server, mirror=forwarder.url)
        )
    return directory


def sent(forwarder: RecordingForwarder, fragment: str) -> list[str]:
    return [path for path in forwarder.paths() if fragment in path]


# --------------------------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------------------------


def test_skopeo_pulls_docker_io_through_the_registries_conf_mirror(
    hub: Distribution, publish: Publish, forwarder: RecordingForwarder, tmp_path: Path
) -> None:
    image = publish(hub, "library/matrix-skopeo", "1.0")
    conf = write_registries_conf(tmp_path, forwarder)

    skopeo_copy("docker.io/library/matrix-skopeo:1.0", tmp_path / "out", "--registries-conf",
                str(conf))  # fmt: skip

    found = verify_dir(tmp_path / "out")
    assert found[DIR_MANIFEST] == image.digest
    assert sent(forwarder, "/v2/library/matrix-skopeo/manifests/1.0")


def test_skopeo_pulls_another_registry_through_a_path_prefix_mirror(
    ghcr: Distribution, publish: Publish, forwarder: RecordingForwarder, tmp_path: Path
) -> None:
    image = publish(ghcr, "acme/matrix-skopeo", "2.0")
    conf = write_registries_conf(tmp_path, forwarder)

    skopeo_copy("ghcr.io/acme/matrix-skopeo:2.0", tmp_path / "out", "--registries-conf",
                str(conf))  # fmt: skip

    found = verify_dir(tmp_path / "out")
    assert found[DIR_MANIFEST] == image.digest
    assert sent(forwarder, "/v2/ghcr.io/acme/matrix-skopeo/manifests/2.0")


# --------------------------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------------------------


def test_podman_pulls_docker_io_through_the_mirror_and_runs_the_image(
    hub: Distribution, publish: Publish, forwarder: RecordingForwarder, tmp_path: Path
) -> None:
    image = publish(hub, "library/matrix-podman", "1.0")
    env = podman_env(tmp_path / "podman", write_registries_conf(tmp_path, forwarder))

    run(["podman", "pull", "--quiet", "docker.io/library/matrix-podman:1.0"], env=env)
    digest = run(
        ["podman", "image", "inspect", "--format", "{{.Digest}}", "matrix-podman:1.0"], env=env
    )
    output = run(
        ["podman", "run", "--rm", "--network", "none", "docker.io/library/matrix-podman:1.0"],
        env=env,
    )

    assert digest.strip() == image.digest
    assert output.strip() == GREETING
    assert sent(forwarder, "/v2/library/matrix-podman/manifests/1.0")


def test_podman_pulls_another_registry_through_a_path_prefix_mirror(
    ghcr: Distribution, publish: Publish, forwarder: RecordingForwarder, tmp_path: Path
) -> None:
    image = publish(ghcr, "acme/matrix-podman", "2.0")
    env = podman_env(tmp_path / "podman", write_registries_conf(tmp_path, forwarder))

    run(["podman", "pull", "--quiet", "ghcr.io/acme/matrix-podman:2.0"], env=env)
    digest = run(
        ["podman", "image", "inspect", "--format", "{{.Digest}}", "ghcr.io/acme/matrix-podman:2.0"],
        env=env,
    )

    assert digest.strip() == image.digest
    assert sent(forwarder, "/v2/ghcr.io/acme/matrix-podman/manifests/2.0")


# --------------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------------


def ctr_pull(containerd: Containerd, hosts_dir: Path, reference: str) -> None:
    containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter",
                   CTR_SNAPSHOTTER, reference)  # fmt: skip


def ctr_digest(containerd: Containerd, reference: str) -> str:
    for line in containerd.ctr("images", "list").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == reference:
            return fields[2]
    raise AssertionError(f"{reference} not in ctr images list")


def test_containerd_pulls_docker_io_through_hosts_toml_and_runs_the_image(
    hub: Distribution,
    publish: Publish,
    forwarder: RecordingForwarder,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    image = publish(hub, "library/matrix-ctr", "1.0")
    hosts_dir = write_hosts_dir(tmp_path / "certs.d", forwarder)
    reference = "docker.io/library/matrix-ctr:1.0"

    ctr_pull(containerd, hosts_dir, reference)
    output = containerd.ctr("run", "--rm", "--snapshotter", CTR_SNAPSHOTTER, reference,
                            "matrix-ctr")  # fmt: skip

    assert ctr_digest(containerd, reference) == image.digest
    assert output.strip() == GREETING
    assert sent(forwarder, "/v2/library/matrix-ctr/manifests/1.0?ns=docker.io")


def test_containerd_pulls_another_registry_through_the_ns_parameter(
    ghcr: Distribution,
    publish: Publish,
    forwarder: RecordingForwarder,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    image = publish(ghcr, "acme/matrix-ctr", "2.0")
    hosts_dir = write_hosts_dir(tmp_path / "certs.d", forwarder)
    reference = "ghcr.io/acme/matrix-ctr:2.0"

    ctr_pull(containerd, hosts_dir, reference)

    assert ctr_digest(containerd, reference) == image.digest
    assert sent(forwarder, "/v2/acme/matrix-ctr/manifests/2.0?ns=ghcr.io")


# --------------------------------------------------------------------------------------------
# Docker Engine
# --------------------------------------------------------------------------------------------


def test_docker_engine_pulls_a_short_name_through_registry_mirrors_and_runs_it(
    hub: Distribution, publish: Publish, forwarder: RecordingForwarder, dockerd: Dockerd
) -> None:
    image = publish(hub, "library/matrix-docker", "1.0")

    dockerd.docker("pull", "--quiet", "matrix-docker:1.0")
    digests = json.loads(dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                        "matrix-docker:1.0"))  # fmt: skip
    output = dockerd.docker("run", "--rm", "--network", "none", "matrix-docker:1.0")

    assert digests == [f"matrix-docker@{image.digest}"]
    assert output.strip() == GREETING
    assert sent(forwarder, "/v2/library/matrix-docker/manifests/1.0")


# --------------------------------------------------------------------------------------------
# Every client, pulling again
# --------------------------------------------------------------------------------------------


def prepared_at_the_connection(mirror: Mirror) -> float:
    """What the mirror answered from prepared responses as soon as a request was parsed
    (`registry_proxy_prepared_answers_total{answered="connection"}`)."""
    connection = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    pattern = r'^registry_proxy_prepared_answers_total\{answered="connection"\} (\S+)$'
    found = re.search(pattern, text, re.M)
    assert found is not None, "no prepared_answers series on /metrics"
    return float(found.group(1))


def test_every_client_pulling_again_is_answered_from_prepared_responses(
    hub: Distribution,
    publish: Publish,
    mirror: Mirror,
    forwarder: RecordingForwarder,
    containerd: Containerd,
    dockerd: Dockerd,
    tmp_path: Path,
) -> None:
    """The third pull of an image repeats the second's manifest requests (each client's own
    method, path and Accept list), which the mirror answers at the connection: every client
    takes those answers and pulls the right image."""
    conf = write_registries_conf(tmp_path, forwarder)
    env = podman_env(tmp_path / "podman", conf)
    hosts_dir = write_hosts_dir(tmp_path / "certs.d", forwarder)
    pulls: dict[str, Callable[[int], object]] = {
        "skopeo": lambda n: skopeo_copy("docker.io/library/again-skopeo:1.0", tmp_path / f"s{n}",
                                        "--registries-conf", str(conf)),
        "podman": lambda n: run(["podman", "pull", "--quiet",
                                 "docker.io/library/again-podman:1.0"], env=env),
        "containerd": lambda n: ctr_pull(containerd, hosts_dir,
                                         "docker.io/library/again-containerd:1.0"),
        "docker": lambda n: dockerd.docker("pull", "--quiet", "again-docker:1.0"),
    }  # fmt: skip
    images = {client: publish(hub, f"library/again-{client}", "1.0") for client in pulls}
    for client, pull in pulls.items():
        before = prepared_at_the_connection(mirror)
        for n in range(3):
            pull(n)
        assert prepared_at_the_connection(mirror) > before, client

    assert verify_dir(tmp_path / "s2")[DIR_MANIFEST] == images["skopeo"].digest
    podman_digest = run(["podman", "image", "inspect", "--format", "{{.Digest}}",
                         "docker.io/library/again-podman:1.0"], env=env)  # fmt: skip
    assert podman_digest.strip() == images["podman"].digest
    ctr_reference = "docker.io/library/again-containerd:1.0"
    assert ctr_digest(containerd, ctr_reference) == images["containerd"].digest
    digests = json.loads(dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                        "again-docker:1.0"))  # fmt: skip
    assert digests == [f"again-docker@{images['docker'].digest}"]
