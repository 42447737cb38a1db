"""The example's API tests for Django's own test runner (``python manage.py test perf``).

They are written as for any Django REST framework project: rows made in ``setUp`` with
the ORM, then requests with the test client. The same suite passes with the replica
URLs pointing at the primary (the replica aliases mirror it) and at real, lagging
replicas: a routed read after writes made outside a request reads a replica that has
replayed them, or the primary. No custom test runner and no fixture for pgreplica.
"""

import os
import unittest

from django.test import TransactionTestCase
from rest_framework.test import APIClient

from perf.models import DataPoint, Signature, Tag
from pgreplica.contrib.django.testing import (
    assert_served_by_primary,
    assert_served_by_replica,
    served_by,
    wait_for_replicas,
)

REAL_REPLICAS = os.environ.get("PERF_TESTS_REAL_REPLICAS") == "1"


class APITests(TransactionTestCase):
    databases = "__all__"

    def setUp(self):
        self.client = APIClient()
        self.cpu = Signature.objects.create(name="cpu")
        self.memory = Signature.objects.create(name="memory", framework="awsy")
        for value in (1.0, 2.0, 6.0):
            DataPoint.objects.create(signature=self.cpu, value=value)

    def test_list_shows_what_setup_created(self):
        response = self.client.get("/api/signatures/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual([s["name"] for s in response.json()], ["cpu", "memory"])

    def test_retrieve_shows_what_setup_created(self):
        response = self.client.get(f"/api/signatures/{self.memory.pk}/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.json()["framework"], "awsy")

    def test_datapoints_filtered_by_signature(self):
        response = self.client.get(f"/api/datapoints/?signature={self.cpu.pk}")
        self.assertEqual(sorted(d["value"] for d in response.json()), [1.0, 2.0, 6.0])

    def test_summary_counts_rows_made_in_the_test(self):
        DataPoint.objects.create(signature=self.memory, value=10.0)
        summary = {row["signature_id"]: row for row in self.client.get("/api/summary/").json()}
        self.assertEqual(summary[self.cpu.pk]["count"], 3)
        self.assertEqual(summary[self.cpu.pk]["mean"], 3.0)
        self.assertEqual(summary[self.memory.pk]["count"], 1)

    def test_a_row_changed_between_requests_is_read_changed(self):
        Signature.objects.filter(pk=self.cpu.pk).update(name="cpu-renamed")
        response = self.client.get(f"/api/signatures/{self.cpu.pk}/")
        self.assertEqual(response.json()["name"], "cpu-renamed")
        self.cpu.delete()
        self.assertEqual(self.client.get(f"/api/signatures/{self.cpu.pk}/").status_code, 404)

    def test_create_through_the_api_then_list(self):
        with assert_served_by_primary():
            created = self.client.post("/api/signatures/", {"name": "io"}, format="json")
        self.assertEqual(created.status_code, 201)
        names = [s["name"] for s in self.client.get("/api/signatures/").json()]
        self.assertEqual(names, ["cpu", "memory", "io"])

    def test_update_through_the_api_then_retrieve(self):
        url = f"/api/signatures/{self.memory.pk}/"
        self.assertEqual(self.client.patch(url, {"framework": "build"}).status_code, 200)
        self.assertEqual(self.client.get(url).json()["framework"], "build")

    def test_tags_stay_on_the_primary(self):
        Tag.objects.create(name="regression")
        with assert_served_by_primary():
            response = self.client.get("/api/tags/")
        self.assertEqual([t["name"] for t in response.json()], ["regression"])

    def test_reads_use_a_replica_once_it_has_replayed(self):
        wait_for_replicas()
        with assert_served_by_replica():
            response = self.client.get("/api/signatures/")
        self.assertEqual(len(response.json()), 2)

    @unittest.skipUnless(REAL_REPLICAS, "the replica aliases mirror the primary")
    def test_the_replicas_really_lag(self):
        """The control: read directly from a replica alias, a row just made is not
        there yet (the suite above would see stale rows if pgreplica did not wait)."""
        Signature.objects.create(name="fresh")
        for alias in ("read_replica", "read_replica_2"):
            with served_by() as seen:
                found = Signature.objects.using(alias).filter(name="fresh").exists()
            self.assertEqual(seen, [alias])
            self.assertFalse(found, alias)
