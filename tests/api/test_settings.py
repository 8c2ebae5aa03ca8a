"""Service settings: environment, a .env-style file, and explicit values, in that order of weight."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from api_data import copy_api
from pydantic import ValidationError

from cmr_search.api.auth import KeyRing
from cmr_search.api.settings import ServeSettings
from cmr_search.core.exceptions import InputError


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


def test_a_key_from_the_environment_is_registered_by_hash(trained_store, tmp_path, monkeypatch):
    """CMR_API_KEY (a container's env file): the service registers its hash at start, and the
    key then works with its role; a malformed key is refused with how to make one."""
    made = subprocess.run([sys.executable, "-m", "cmr_search.cli", "keys", "create", "--no-store"], capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setenv("CMR_API_KEY", made)
    monkeypatch.setenv("CMR_API_KEY_ROLE", "read")
    api = copy_api(trained_store, tmp_path)
    with api.client as client:
        ok = client.get("/heads", headers={"Authorization": f"Bearer {made}"})
        assert ok.status_code == 200
        denied = client.delete(f"/studies/{'1.2.3'}", headers={"Authorization": f"Bearer {made}"})
        assert denied.status_code == 403  # a read key
    stored = (api.root / "secrets" / "api_keys.json").read_text()
    assert made.split("_", 2)[2] not in stored and json.loads(stored)["keys"]
    with pytest.raises(InputError, match="cmr keys create --no-store"):
        KeyRing(api.root).register("not-a-key", "read")
