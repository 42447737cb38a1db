from rest_framework import serializers

from perf.models import Alert, AlertSummary, DataPoint, Signature, Tag


class SignatureSerializer(serializers.ModelSerializer):
    class Meta:
        model = Signature
        fields = ["id", "name", "framework"]


class DataPointSerializer(serializers.ModelSerializer):
    class Meta:
        model = DataPoint
        fields = ["id", "signature", "value"]


class AlertSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = AlertSummary
        fields = ["id", "signature", "status"]


class AlertSerializer(serializers.ModelSerializer):
    class Meta:
        model = Alert
        fields = ["id", "summary", "amount"]


class TagSerializer(serializers.ModelSerializer):
    class Meta:
        model = Tag
        fields = ["id", "name", "touched"]
