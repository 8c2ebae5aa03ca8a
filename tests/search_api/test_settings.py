"""Service settings: environment, a .env-style file, and explicit values, in that order of weight."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from search_api.settings import ServeSettings


def test_settings_from_env_file_and_overrides(tmp_path, monkeypatch):
    for name in ("CMR_MAX_K", "CMR_PORT", "CMR_AUTH", "CMR_CINE_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / "serve.env"
    env_file.write_text("CMR_MAX_K=25\nCMR_PORT=9100\nCMR_CINE_FORMAT=gif\n")
    monkeypatch.setenv("CMR_PORT", "9200")  # the environment wins over the file
    s = ServeSettings(_env_file=env_file, auth=False)
    assert (s.max_k, s.port, s.cine_format, s.auth) == (25, 9200, "gif", False)
    assert ServeSettings().max_k == 100 and ServeSettings().auth


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError):
        ServeSettings(cine_format="mp4")
    with pytest.raises(ValidationError):
        ServeSettings(max_k=0)
