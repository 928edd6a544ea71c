"""The README's configuration examples load as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config import load_settings

README = Path(__file__).resolve().parents[1] / "README.md"
# Client configuration (containerd hosts.toml, registries.conf) is exercised by the client tests.
CLIENT_MARKERS = ("[[registry", "[host.", "server =")
MIRROR_CONFIGS = [
    block
    for block in re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    if not any(marker in block for marker in CLIENT_MARKERS)
]


def test_the_readme_has_mirror_config_examples() -> None:
    assert len(MIRROR_CONFIGS) >= 2


@pytest.mark.parametrize("block", MIRROR_CONFIGS)
def test_every_mirror_config_example_in_the_readme_loads(block: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("token")
    text = re.sub(r'"/run/secrets/[^"]+"', f'"{secret}"', block)
    config = tmp_path / "config.toml"
    config.write_text(text)
    settings = load_settings(config, environ={})
    assert settings.upstreams
