"""The shared state of a store on object storage (moto standing in for S3): conditional
writes that never lose a concurrent writer's change, folders published whole."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from s3 import s3_server

from cmr_search.store.shared import SharedState


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def state(s3, monkeypatch):
    s3.apply_env(monkeypatch)
    return SharedState(s3.uri(s3.new_bucket(), "site/a"))


def test_objects_live_under_the_state_prefix(s3, state):
    state.put("secrets/withdrawn", b"s:1\n")
    bucket = state.uri.split("/")[2]
    assert s3.keys("site/a", bucket=bucket) == ["site/a/state/secrets/withdrawn"]
    assert state.get("secrets/withdrawn").data == b"s:1\n"
    assert state.get("nothing/here") is None and state.etag("nothing/here") is None
    assert state.list("secrets") == ["secrets/withdrawn"]
    state.delete("secrets/withdrawn")
    state.delete("secrets/withdrawn")  # absent: nothing to do
    assert state.list() == []


def test_create_and_replace_are_conditional(state):
    assert state.create("salt", b"first")
    assert not state.create("salt", b"second")
    blob = state.get("salt")
    assert blob.data == b"first" and blob.etag == state.etag("salt")
    assert state.replace("salt", b"third", blob.etag)
    assert not state.replace("salt", b"lost", blob.etag)  # stale: another writer came between
    assert state.get("salt").data == b"third"
    assert state.conditional_writes_work()


def test_concurrent_updates_lose_nothing(state):
    def add(line: str) -> None:
        state.update("secrets/withdrawn", lambda old: (old or b"") + f"{line}\n".encode())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, [f"s:{i}" for i in range(24)]))
    lines = state.get("secrets/withdrawn").data.decode().split()
    assert sorted(lines) == sorted(f"s:{i}" for i in range(24))
    assert state.update("secrets/withdrawn", lambda old: None) == state.get("secrets/withdrawn").data


def test_folders_round_trip_with_the_marker_last(state, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\0" * 1000)
    (src / "sub" / "x.txt").write_text("x")
    state.upload_folder(src, "encoders/abc", last="config.json")
    assert state.list("encoders/abc") == ["encoders/abc/config.json", "encoders/abc/model.safetensors",
                                          "encoders/abc/sub/x.txt"]
    out = tmp_path / "copy" / "abc"
    assert state.download_folder("encoders/abc", out)
    assert (out / "model.safetensors").read_bytes() == b"\0" * 1000 and (out / "sub" / "x.txt").read_text() == "x"
    assert not state.download_folder("encoders/none", tmp_path / "copy" / "none")
    assert not (tmp_path / "copy" / "none").exists()
    assert [p.name for p in (tmp_path / "copy").iterdir()] == ["abc"]  # no scratch left


def test_a_large_file_goes_up_in_parts_and_comes_down_streamed(state, tmp_path):
    data = os.urandom(13 * 1024 * 1024)  # above obstore's 5 MB part size: a multipart upload
    (tmp_path / "index.faiss").write_bytes(data)
    state.put_file("indexes/views/m/gen-1/index.faiss", tmp_path / "index.faiss")
    assert state.get_file("indexes/views/m/gen-1/index.faiss", tmp_path / "back.faiss")
    assert (tmp_path / "back.faiss").read_bytes() == data
    assert not state.get_file("indexes/views/m/gen-2/index.faiss", tmp_path / "none.faiss")
    assert not (tmp_path / "none.faiss").exists()
