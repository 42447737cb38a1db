"""The example's own tests, run with pytest-django: the replica aliases are declared in
``databases`` and, in the test database, mirror the primary (TEST MIRROR)."""

import pytest
from django.test import Client
from perf.models import Signature

from pgreplica.contrib.django.testing import assert_served_by_primary, assert_served_by_replica

pytestmark = pytest.mark.django_db(
    databases=["default", "read_replica", "read_replica_2"], transaction=True
)


def test_signature_list_is_served_by_a_replica_alias():
    Signature.objects.create(name="pytest-django")
    with assert_served_by_replica():
        response = Client().get("/api/signatures/")
    assert response.status_code == 200
    assert [s["name"] for s in response.json()] == ["pytest-django"]


def test_creating_a_tag_uses_the_primary():
    with assert_served_by_primary():
        response = Client().post("/api/tags/", {"name": "t"}, content_type="application/json")
    assert response.status_code == 201
