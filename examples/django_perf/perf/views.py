"""Read-only endpoints opt into the replica; mutating ones stay on the primary."""

from django.db import transaction
from django.db.models import Avg, Count
from django.http import JsonResponse
from rest_framework import viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from perf import models, serializers
from pgreplica.contrib.django import ReadReplicaMixin, read_replica


def announce(signature_id):
    """Tell the live-updates subscribers, once the write has committed. The channel
    layer (pgreplica's envelope layer) stamps the message with this write's position."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from perf.consumers import GROUP

    layer = get_channel_layer()
    if layer is not None:
        message = {"type": "signature.updated", "id": signature_id}
        transaction.on_commit(lambda: async_to_sync(layer.group_send)(GROUP, message))


class SignatureViewSet(ReadReplicaMixin, viewsets.ModelViewSet):
    """Creating signatures is allowed, but only list and retrieve use the replica."""

    replica_actions = ("list", "retrieve")
    queryset = models.Signature.objects.order_by("id")
    serializer_class = serializers.SignatureSerializer

    def perform_create(self, serializer):
        announce(serializer.save().pk)

    def perform_update(self, serializer):
        announce(serializer.save().pk)


class DataPointViewSet(ReadReplicaMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = serializers.DataPointSerializer

    def get_queryset(self):
        queryset = models.DataPoint.objects.order_by("id")
        signature = self.request.query_params.get("signature")
        return queryset.filter(signature_id=signature) if signature else queryset


class SummaryView(ReadReplicaMixin, APIView):
    def get(self, request):
        data = models.DataPoint.objects.values("signature_id").annotate(
            count=Count("id"), mean=Avg("value")
        )
        return Response(list(data.order_by("signature_id")))


# Mutating endpoints: left on the primary so that create -> read flows stay consistent.
class AlertSummaryViewSet(viewsets.ModelViewSet):
    queryset = models.AlertSummary.objects.order_by("id")
    serializer_class = serializers.AlertSummarySerializer


class AlertViewSet(viewsets.ModelViewSet):
    queryset = models.Alert.objects.order_by("id")
    serializer_class = serializers.AlertSerializer


class TagViewSet(viewsets.ModelViewSet):
    queryset = models.Tag.objects.order_by("id")
    serializer_class = serializers.TagSerializer


@read_replica
def signature_count(request):
    """A function view on the replica; inside transaction.atomic() reads go to the primary."""
    count = models.Signature.objects.count()
    if request.GET.get("atomic"):
        with transaction.atomic():
            count = models.Signature.objects.count()
    return JsonResponse({"count": count})


@read_replica
def tag_touch(request):
    """A GET that writes: after the write, the rest of the request reads the primary."""
    name = request.GET["name"]
    before = models.Tag.objects.filter(name=name).values_list("touched", flat=True).first()
    models.Tag.objects.filter(name=name).update(touched=(before or 0) + 1)
    after = models.Tag.objects.get(name=name).touched
    return JsonResponse({"before": before, "after": after})
