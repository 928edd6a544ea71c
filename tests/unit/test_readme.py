"""The README's configuration examples load as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config.load import load_settings

README = Path(__file__).resolve().parents[2] / "README.md"
# The mirror's own config files; client configuration (containerd, registries.conf) is
# exercised by the client tests.
MIRROR_CONFIGS = [
    block
    for block in re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    if "cache_dir" in block or "[[upstreams]]" in block
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
