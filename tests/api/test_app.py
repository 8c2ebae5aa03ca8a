"""The app's assembly: every route carries its router's tag, and every domain error the
service can raise leaves with its status and code (the handler table is complete)."""

from __future__ import annotations

import importlib
import pkgutil
import threading
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from cmr_search.api import errors, routes
from cmr_search.api.app import DOMAIN_ERRORS, create_app
from cmr_search.api.settings import ServeSettings
from cmr_search.core.exceptions import CmrError, InputError, StoreError


def _stub_app(tmp_path, **service):
    """The app over a stand-in service (warm, auth off): the assembly alone, no store."""
    ready = threading.Event()
    ready.set()
    return create_app(ServeSettings(store=tmp_path, auth=False), service=SimpleNamespace(ready=ready, **service))


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct} | _subclasses(direct)}


def test_every_route_carries_its_router_s_tag(tmp_path):
    modules = [importlib.import_module(f"{routes.__name__}.{m.name}") for m in pkgutil.iter_modules(routes.__path__)]
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} == {"health", "search", "studies", "heads", "clusters", "page"}
    for module in modules:
        name = module.__name__.rsplit(".", 1)[1]
        assert module.router.tags == [name] and module.router.routes, name
        for route in module.router.routes:
            assert route.tags == [name], (name, route.path)
    schema = _stub_app(tmp_path).openapi()
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert len(operations) == 12 and all(len(op["tags"]) == 1 for op in operations)


def test_every_domain_error_maps_to_a_status():
    ours = {cls for cls in _subclasses(CmrError) if cls.__module__.startswith("cmr_search.")} - {errors.ServiceError}
    assert {errors.NotFound, errors.TooLarge, InputError, StoreError} <= ours
    for cls in ours:
        if cls.__module__ == errors.__name__:  # a kind of its own: never answered as its base's status
            assert cls in DOMAIN_ERRORS, cls
        else:
            assert any(base in DOMAIN_ERRORS for base in cls.__mro__), cls


@pytest.mark.parametrize(("error", "status", "code"), [
    (errors.NotFound("study_not_found", "no study 9"), 404, "study_not_found"),
    (errors.Conflict("no_encoder", "no encoder"), 409, "no_encoder"),
    (errors.TooLarge("too_many_files", "too many"), 413, "too_many_files"),
    (errors.InvalidUpload("zip_bomb", "a bomb"), 400, "zip_bomb"),
    (errors.Unusable("no_cine_study", "no cine"), 422, "no_cine_study"),
    (InputError("bad column"), 400, "bad_request"),
    (StoreError("store gone"), 503, "store_unavailable"),
])
def test_a_domain_error_leaves_with_its_status_and_code(tmp_path, error, status, code):
    def heads():
        raise error

    r = TestClient(_stub_app(tmp_path, heads=heads)).get("/heads")
    assert r.status_code == status
    assert r.json() == {"error": {"status": status, "code": code, "message": str(error)}}


def test_the_openapi_document_tells_the_keys_and_limits_the_server_enforces(trained_store):
    app = create_app(ServeSettings(store=trained_store[0], max_k=25), service=object(), warm_in_background=True)
    doc = app.openapi()
    for path in ("/heads", "/clusters", "/metrics"):
        assert {"401", "403"} <= set(doc["paths"][path]["get"]["responses"]), path
    (k,) = [p for p in doc["paths"]["/studies/{study_uid}/neighbors"]["get"]["parameters"] if p["name"] == "k"]
    assert k["schema"]["maximum"] == 25 == doc["components"]["schemas"]["TextQuery"]["properties"]["k"]["maximum"]
    upload = doc["paths"]["/studies"]["post"]["requestBody"]
    assert upload["required"] and "files" in doc["components"]["schemas"]["Body_upload_studies_post"]["required"]
