"""Settings from the environment: each one the README's tables document."""

from pathlib import Path

import pytest

from shared.settings import ApiSettings, BedrockSettings, Settings

README = (Path(__file__).parents[3] / "README.md").read_text()


@pytest.mark.parametrize("settings", [Settings, ApiSettings, BedrockSettings])
def test_every_setting_is_in_the_readmes_tables(settings):
    """By its variable, or as ``_SUFFIX`` in a row that names its prefix's first one."""
    prefix = settings.model_config["env_prefix"]
    rows = [line for line in README.splitlines() if line.startswith(f"| `{prefix}")]
    missing = [
        f"{prefix}{name}".upper()
        for name in settings.model_fields
        if not any(
            f"`{prefix}{name}`".upper() in row.upper() or f"`_{name}`".upper() in row.upper()
            for row in rows
        )
    ]
    assert missing == [], f"README.md does not document {', '.join(missing)}"
