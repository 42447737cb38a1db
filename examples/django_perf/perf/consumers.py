"""Live updates: a websocket subscriber is told "signature N changed" through the channel
layer and pushes the signature, read from a replica that has replayed the change."""

from channels.generic.websocket import JsonWebsocketConsumer

from perf import models
from pgreplica.contrib.channels import ReplicaConsumerMixin

GROUP = "signatures"


class SignatureUpdates(ReplicaConsumerMixin, JsonWebsocketConsumer):
    groups = [GROUP]

    def signature_updated(self, event):
        # The mixin runs this with replica reads on a replica that has replayed the
        # sender's write (or on the primary when none has within the wait).
        signatures = models.Signature.objects.filter(pk=event["id"])
        found = signatures.values("id", "name").first()
        self.send_json({"id": event["id"], "signature": found, "alias": signatures.db})
