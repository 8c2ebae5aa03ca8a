"""Contract fuzzing: schemathesis generates requests from the app's own OpenAPI schema
(valid and invalid ones); none may end in a server error (5xx)."""

from __future__ import annotations

import pytest
import schemathesis
from api_data import copy_api
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def contract(trained_store, tmp_path_factory):
    """An app over a private store copy (fuzzed DELETEs may withdraw studies), warmed."""
    handle = copy_api(trained_store, tmp_path_factory.mktemp("contract"))
    handle.client.app.state.service.warm()
    return handle


def test_no_request_from_the_schema_gets_a_5xx(contract):
    schema = schemathesis.openapi.from_asgi("/openapi.json", contract.client.app)
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(headers=contract.write, checks=[schemathesis.checks.not_a_server_error])

        fuzz()
        tested.append(operation.label)
    assert {"POST /search/text", "GET /studies/{study_uid}/neighbors", "POST /studies"} <= set(tested)
