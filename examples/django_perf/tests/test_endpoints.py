"""The example's own tests, run with pytest-django: the replica aliases are declared in
``databases`` and, in the test database, mirror the primary (TEST MIRROR)."""

import pytest
from django.test import Client, TestCase
from perf.models import Signature

from pgreplica.contrib.django.testing import assert_served_by_primary, assert_served_by_replica

pytestmark = pytest.mark.django_db(
    databases=["default", "read_replica", "read_replica_2"], transaction=True
)


def test_signature_list_is_served_by_a_replica_alias():
    created = Client().post(
        "/api/signatures/", {"name": "pytest-django"}, content_type="application/json"
    )
    token = created.headers["X-PgReplica-Token"]  # read-your-writes for the next request
    with assert_served_by_replica():
        response = Client().get("/api/signatures/", HTTP_X_PGREPLICA_TOKEN=token)
    assert response.status_code == 200
    assert [s["name"] for s in response.json()] == ["pytest-django"]


def test_creating_a_tag_uses_the_primary():
    with assert_served_by_primary():
        response = Client().post("/api/tags/", {"name": "t"}, content_type="application/json")
    assert response.status_code == 201


class SignatureTestCase(TestCase):
    """Django's TestCase runs each test inside a transaction on the primary; other
    connections (the replica aliases) cannot see its uncommitted rows, so the router
    keeps reads inside it on the primary, as for any transaction.atomic() block. The
    endpoints still work unchanged; use TransactionTestCase (or pytest-django's
    transaction=True) to exercise replica routing itself."""

    databases = {"default", "read_replica", "read_replica_2"}

    def test_list_sees_the_test_transaction(self):
        Signature.objects.create(name="testcase")
        with assert_served_by_primary():
            response = self.client.get("/api/signatures/")
        self.assertEqual([s["name"] for s in response.json()], ["testcase"])
