from django.db import models


class Signature(models.Model):
    name = models.CharField(max_length=200, unique=True)
    framework = models.CharField(max_length=50, default="talos")
    created = models.DateTimeField(auto_now_add=True)


class DataPoint(models.Model):
    signature = models.ForeignKey(Signature, on_delete=models.CASCADE, related_name="data")
    value = models.FloatField()
    push_timestamp = models.DateTimeField(auto_now_add=True)


class AlertSummary(models.Model):
    signature = models.ForeignKey(Signature, on_delete=models.CASCADE)
    status = models.CharField(max_length=20, default="untriaged")


class Alert(models.Model):
    summary = models.ForeignKey(AlertSummary, on_delete=models.CASCADE, related_name="alerts")
    amount = models.FloatField()


class Tag(models.Model):
    name = models.CharField(max_length=100, unique=True)
    touched = models.IntegerField(default=0)
