"""Property-based API test: schemathesis generates requests from the OpenAPI schema (valid and invalid
bodies, path and query parameters) and sends them as a signed-in clinician; no response may be a server
error (5xx), and every response must conform to the schema's status codes."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from cnidose.records.db import make_engine, upgrade  # noqa: E402
from cnidose.records.demo import seed_demo  # noqa: E402
from cnidose.records.store import SYSTEM, Store  # noqa: E402
from cnidose.web.app import create_app  # noqa: E402
from cnidose.web.security import hash_password  # noqa: E402

_DB = Path(tempfile.mkdtemp(prefix="cnidose-fuzz-")) / "cnidose.db"
_ENGINE = make_engine(f"sqlite:///{_DB}")
upgrade(_ENGINE)
_STORE = Store(_ENGINE)
seed_demo(_STORE, dt.date(2026, 11, 25))
_STORE.create_user(SYSTEM, "fuzz", hash_password("fuzz-pw"), "clinician")
APP = create_app(_STORE, secret_key="fuzz", today=lambda: dt.date(2026, 11, 25))
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)


def _session() -> tuple[dict[str, str], dict[str, str]]:
    r = TestClient(APP).post("/api/v1/session", json={"username": "fuzz", "password": "fuzz-pw"})
    assert r.status_code == 200
    return {"cnidose_session": r.cookies["cnidose_session"]}, {"X-CSRF-Token": r.json()["csrf"]}


COOKIES, HEADERS = _session()


@schema.exclude(path="/api/v1/session").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: object) -> None:
    response = case.call(cookies=COOKIES, headers=HEADERS)  # type: ignore[attr-defined]
    case.validate_response(response, checks=(not_a_server_error,))  # type: ignore[attr-defined]
