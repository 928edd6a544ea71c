"""Real clients pull a private image through a mirror that holds no credentials of its own.

The private upstream is a real Distribution with htpasswd (HTTP Basic) auth; the mirror passes
each client's own credentials on (`pass_client_credentials = true`). Every client is configured
the way its documentation says to give credentials for a registry host: skopeo and podman an
`auth.json` entry for the mirror's host (containers/image never sends `--creds` to a mirror),
containerd `ctr --user`, dockerd the CLI's login for docker.io (what it sends to its
`registry-mirrors`). Anonymous and wrong-password attempts are
refused, before and after the image is cached, and anonymous pulls of public content keep
working although the mirror's `/v2/` now challenges (REFERENCE.md, "Who sends credentials
when").
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from harness.images import Image
from harness.mirror import Mirror, upstream_tables
from harness.processes import Distribution
from harness.push import push_image
from harness.skopeo import client_env
from harness.verify import DIR_MANIFEST, verify_dir

from .conftest import Publish
from .daemons import CommandError, Containerd, Dockerd, podman_env, run
from .images import build_runnable_image
from .test_client_matrix import CTR_SNAPSHOTTER, ctr_digest

pytestmark = pytest.mark.clients

USER, PASSWORD = "alice", "wonderland"
PRIVATE = "corp.example"  # the private registry's name, as clients know it
REPOSITORY, TAG = "team/app", "1.0"


def credential_passing_mirror(
    workdir: Path, upstreams: dict[str, str], passing: set[str]
) -> Mirror:
    """The mirror with `[[upstreams]]` tables; `passing` names those that pass credentials on.

    Its ping challenges anonymous clients once an upstream passes credentials on: ready on 401.
    """
    config = upstream_tables(upstreams, passing=passing)
    return Mirror(workdir, None, config=config, ready=(401,))


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Distribution]:
    workdir = tmp_path_factory.mktemp("private")
    htpasswd = workdir / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
    htpasswd.write_text(f"{USER}:{hashed}\n")
    with Distribution(workdir, htpasswd=htpasswd) as registry:
        yield registry


@pytest.fixture(scope="module")
def private_image(private_registry: Distribution) -> Image:
    image = build_runnable_image("docker")

    async def upload() -> None:
        login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {login}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            await push_image(session, private_registry.url, REPOSITORY, image, TAG)

    asyncio.run(upload())
    return image


@pytest.fixture(scope="module")
def passing_mirror(
    tmp_path_factory: pytest.TempPathFactory, hub: Distribution, private_registry: Distribution
) -> Iterator[Mirror]:
    """docker.io: the public hub (default upstream); corp.example: private, passing through."""
    upstreams = {"docker.io": hub.url, PRIVATE: private_registry.url}
    with credential_passing_mirror(
        tmp_path_factory.mktemp("passing"), upstreams, {PRIVATE}
    ) as running:
        yield running


REGISTRIES_CONF = """\
[[registry]]
prefix = "docker.io"
location = "registry-1.docker.io"
[[registry.mirror]]
location = "{mirror}"
insecure = true

[[registry]]
prefix = "{private}"
location = "{private}"
[[registry.mirror]]
location = "{mirror}/{private}"
insecure = true
"""


def registries_conf(directory: Path, mirror: Mirror) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "registries.conf"
    path.write_text(REGISTRIES_CONF.format(mirror=mirror.host, private=PRIVATE))
    return path


def skopeo(
    conf: Path, reference: str, dest: Path, *credentials: str
) -> subprocess.CompletedProcess[str]:
    args = ["skopeo", "--insecure-policy", "--registries-conf", str(conf), "copy", "--quiet",
            "--src-tls-verify=false", *credentials,
            f"docker://{reference}", f"dir:{dest}"]  # fmt: skip
    return subprocess.run(
        args, capture_output=True, text=True, env=client_env(), timeout=120, check=False
    )


def auth_file(path: Path, mirror: Mirror, password: str) -> Path:
    """An auth.json with credentials for the mirror's host, as `podman login` writes it."""
    login = base64.b64encode(f"{USER}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {mirror.host: {"auth": login}}}))
    return path


def refusals(mirror: Mirror, path: str) -> list[dict[str, object]]:
    """The mirror's access log entries that answered `path` with 401."""
    lines = mirror.settled_log().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in entries if e.get("path") == path and e.get("status") == 401]


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "unauthorized" in result.stderr.lower()


# --------------------------------------------------------------------------------------------
# skopeo and podman (containers/image)
# --------------------------------------------------------------------------------------------


def test_skopeo_pulls_a_private_image_with_its_credentials_and_is_refused_without(
    passing_mirror: Mirror,
    private_image: Image,
    hub: Distribution,
    publish: Publish,
    tmp_path: Path,
) -> None:
    conf = registries_conf(tmp_path, passing_mirror)
    private = f"{PRIVATE}/{REPOSITORY}:{TAG}"
    anonymous = ("--src-no-creds",)
    wrong = ("--src-authfile", str(auth_file(tmp_path / "wrong.json", passing_mirror, "guess")))
    right = ("--src-authfile", str(auth_file(tmp_path / "auth.json", passing_mirror, PASSWORD)))

    for attempt in (anonymous, wrong):  # nothing cached yet
        assert refused(skopeo(conf, private, tmp_path / "refused", *attempt)), attempt
    pulled = skopeo(conf, private, tmp_path / "out", *right)
    assert pulled.returncode == 0, pulled.stderr
    assert verify_dir(tmp_path / "out")[DIR_MANIFEST] == private_image.digest
    for attempt in (anonymous, wrong):  # now cached
        assert refused(skopeo(conf, private, tmp_path / "refused2", *attempt)), attempt

    # A public image through the same mirror, whose ping now challenges: anonymous is fine.
    public = publish(hub, "library/creds-public-skopeo", "1.0")
    result = skopeo(conf, "docker.io/library/creds-public-skopeo:1.0", tmp_path / "pub",
                    *anonymous)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert verify_dir(tmp_path / "pub")[DIR_MANIFEST] == public.digest


def test_podman_pulls_a_private_image_with_an_auth_file_for_the_mirrors_host(
    passing_mirror: Mirror,
    private_image: Image,
    hub: Distribution,
    publish: Publish,
    tmp_path: Path,
) -> None:
    env = podman_env(tmp_path / "podman", registries_conf(tmp_path, passing_mirror))
    reference = f"{PRIVATE}/{REPOSITORY}:{TAG}"
    with pytest.raises(CommandError, match=r"(?i)unauthorized"):
        run(["podman", "pull", "--quiet", reference], env=env)

    wrong = auth_file(tmp_path / "wrong.json", passing_mirror, "guess")
    with pytest.raises(CommandError, match=r"(?i)unauthorized"):
        run(["podman", "pull", "--quiet", "--authfile", str(wrong), reference], env=env)
    right = auth_file(tmp_path / "auth.json", passing_mirror, PASSWORD)
    run(["podman", "pull", "--quiet", "--authfile", str(right), reference], env=env)
    digest = run(["podman", "image", "inspect", "--format", "{{.Digest}}", reference], env=env)
    assert digest.strip() == private_image.digest

    public = publish(hub, "library/creds-public-podman", "1.0")
    run(["podman", "pull", "--quiet", "docker.io/library/creds-public-podman:1.0"], env=env)
    digest = run(["podman", "image", "inspect", "--format", "{{.Digest}}",
                  "docker.io/library/creds-public-podman:1.0"], env=env)  # fmt: skip
    assert digest.strip() == public.digest


# --------------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------------

HOSTS_TOML = """\
server = "https://{private}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
"""


def test_containerd_pulls_a_private_image_with_ctr_user_and_is_refused_without(
    passing_mirror: Mirror,
    private_image: Image,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    hosts = tmp_path / "certs.d"
    (hosts / PRIVATE).mkdir(parents=True)
    (hosts / PRIVATE / "hosts.toml").write_text(
        HOSTS_TOML.format(private=PRIVATE, mirror=passing_mirror.url)
    )
    reference = f"{PRIVATE}/{REPOSITORY}:{TAG}"

    def pull(*credentials: str) -> None:
        containerd.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter",
                       CTR_SNAPSHOTTER, *credentials, reference)  # fmt: skip

    for attempt in ((), ("--user", f"{USER}:guess")):
        with pytest.raises(CommandError, match=r"(?i)unauthorized|401"):
            pull(*attempt)
    pull("--user", f"{USER}:{PASSWORD}")
    assert ctr_digest(containerd, reference) == private_image.digest
    containerd.ctr("images", "remove", reference)
    with pytest.raises(CommandError, match=r"(?i)unauthorized|401"):
        pull()  # cached now, still refused


# --------------------------------------------------------------------------------------------
# Docker Engine
# --------------------------------------------------------------------------------------------


def test_docker_engine_pulls_public_images_anonymously_from_a_challenging_mirror(
    passing_mirror: Mirror, hub: Distribution, publish: Publish
) -> None:
    image = publish(hub, "library/creds-public-docker", "1.0")
    with Dockerd({"registry-mirrors": [passing_mirror.url]}) as daemon:
        daemon.start()
        daemon.docker("pull", "--quiet", "creds-public-docker:1.0")
        inspect = ("image", "inspect", "--format", "{{json .RepoDigests}}")
        digests = json.loads(daemon.docker(*inspect, "creds-public-docker:1.0"))
    assert digests == [f"creds-public-docker@{image.digest}"]


def test_docker_engine_pulls_a_private_image_with_its_docker_io_login(
    tmp_path_factory: pytest.TempPathFactory,
    private_registry: Distribution,
    private_image: Image,
) -> None:
    # dockerd sends its registry-mirrors the credentials of the registry they mirror (docker.io).
    upstreams = {"docker.io": private_registry.url}
    workdir = tmp_path_factory.mktemp("passing-hub")
    with (
        credential_passing_mirror(workdir, upstreams, {"docker.io"}) as mirror,
        Dockerd({"registry-mirrors": [mirror.url]}) as daemon,
    ):
        daemon.start()
        reference = f"{REPOSITORY}:{TAG}"
        # Refused by the mirror, dockerd falls back to Docker Hub, unreachable here.
        with pytest.raises(CommandError):
            daemon.docker("pull", "--quiet", reference)
        assert refusals(mirror, f"/v2/{REPOSITORY}/manifests/{TAG}")
        config = Path(daemon.env["DOCKER_CONFIG"])
        config.mkdir(parents=True, exist_ok=True)
        login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        auths = {"auths": {"https://index.docker.io/v1/": {"auth": login}}}
        (config / "config.json").write_text(json.dumps(auths))
        daemon.docker("pull", "--quiet", reference)
        digests = json.loads(daemon.docker("image", "inspect", "--format",
                                           "{{json .RepoDigests}}", reference))  # fmt: skip
    assert digests == [f"{REPOSITORY}@{private_image.digest}"]
