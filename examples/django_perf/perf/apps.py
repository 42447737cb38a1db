from django.apps import AppConfig


class PerfConfig(AppConfig):
    name = "perf"
    default_auto_field = "django.db.models.BigAutoField"
