"""Service settings: environment, a .env-style file, and explicit values, in that order of weight."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from api_data import copy_api
from pydantic import ValidationError

from cmr_search.api.auth import KeyRing
from cmr_search.api.settings import ServeSettings, viewer_link
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


@pytest.mark.parametrize(("template", "says"), [
    ("http://orthanc:8042/ui/app/#/filtered-studies?StudyInstanceUID={study_uid}&p={patient_id}", "not {patient_id}"),
    ("https://viewer/viewer?StudyInstanceUIDs={uid}", "only the placeholder {study_uid}, not {uid}"),
    ("https://viewer/viewer?StudyInstanceUIDs={study_uid!r}", "not {study_uid!r}"),
    ("https://viewer/viewer", "and it has none"),
    ("https://viewer/viewer?StudyInstanceUIDs={study_uid", "not a valid template"),
    ("javascript:alert({study_uid})", "not an http(s) URL"),
])
def test_a_viewer_url_template_with_other_placeholders_is_refused_at_start(template, says, monkeypatch):
    with pytest.raises(ValidationError, match="viewer_url") as refused:
        ServeSettings(viewer_url=template)
    assert says in str(refused.value)
    monkeypatch.setenv("CMR_VIEWER_URL", template)  # the environment is checked the same way
    with pytest.raises(ValidationError, match="viewer_url"):
        ServeSettings()


def test_a_viewer_url_encodes_the_uid_and_is_off_by_default():
    assert ServeSettings().viewer_url is None
    template = ServeSettings(viewer_url="https://viewer/viewer?StudyInstanceUIDs={study_uid}").viewer_url
    assert viewer_link(template, "1.2.3") == "https://viewer/viewer?StudyInstanceUIDs=1.2.3"
    assert viewer_link(template, "1.2&x=3") == "https://viewer/viewer?StudyInstanceUIDs=1.2%26x%3D3"
    assert viewer_link(None, "1.2.3") is None


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
