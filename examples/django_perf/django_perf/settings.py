"""Settings of the example: a performance-data service whose read-only endpoints use
a replica. Configured entirely from the environment:

- DATABASE_URL: the primary (``postgresql://user:pass@host:port/dbname``)
- READ_REPLICA_ENABLED=true and READ_REPLICA_DATABASE_URL (or ..._URLS, comma
  separated): the replicas. Unset or false: no replica alias, everything on the primary.
- Without DATABASE_URL, PGREPLICA_CONFIG (``pgreplica cluster up`` writes one): the
  primary and the replicas of its first database, database ``django_perf`` on each.
- REDIS_URL: the channel layer of the live updates (``/ws/signatures/``) is
  channels-redis there; unset, an in-memory layer (one process only).
"""

import os

from psycopg.conninfo import conninfo_to_dict

from pgreplica.contrib.django import replica_databases

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "django_perf.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "rest_framework",
    "perf",
    "pgreplica.contrib.django",  # manage.py pgreplica_status
]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "pgreplica.contrib.django.PgReplicaMiddleware",
]
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}


def _database(url: str) -> dict[str, object]:
    params = conninfo_to_dict(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname", "postgres"),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", "127.0.0.1"),
        "PORT": params.get("port", "5432"),
    }


def _local_cluster(name: str) -> tuple[str, dict[str, str]]:
    """The primary's URL and the replicas' (as READ_REPLICA_DATABASE_URLS) from a
    pgreplica TOML file, with database ``name``."""
    from psycopg.conninfo import make_conninfo

    from pgreplica.config import Settings

    database = Settings.from_toml(os.environ["PGREPLICA_CONFIG"]).database(None)
    replicas = ",".join(make_conninfo(r.conninfo, dbname=name) for r in database.replicas)
    env = {**os.environ, "READ_REPLICA_DATABASE_URLS": replicas}
    return make_conninfo(database.primary.conninfo, dbname=name), env


_env = None
_primary = os.environ.get("DATABASE_URL")
if not _primary and os.environ.get("PGREPLICA_CONFIG"):
    _primary, _env = _local_cluster("django_perf")
DATABASES = {"default": _database(_primary or "postgresql:///django_perf")}
DATABASES.update(replica_databases(DATABASES["default"], env=_env))
DATABASE_ROUTERS = ["pgreplica.contrib.django.ReadReplicaRouter"]

PGREPLICA = {
    # Only these apps' models may be read from a replica.
    "REPLICA_APPS": {"perf"},
    # Keep the causal token server-side too, for authenticated clients without cookies.
    "STICKING": os.environ.get("PGREPLICA_STICKING") or None,
    "SETTINGS": {
        key: value
        for key, value in {
            "probe_interval": os.environ.get("PGREPLICA_PROBE_INTERVAL"),
        }.items()
        if value
    },
}

# Live updates (django_perf/asgi.py): every message sent through the layer carries the
# sender's WAL positions; SignatureUpdates reads on a replica that has replayed them.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "pgreplica.contrib.channels.EnvelopeChannelLayer",
        "CONFIG": {
            "layer": (
                {
                    "BACKEND": "channels_redis.core.RedisChannelLayer",
                    "CONFIG": {"hosts": [os.environ["REDIS_URL"]]},
                }
                if os.environ.get("REDIS_URL")
                else {"BACKEND": "channels.layers.InMemoryChannelLayer"}
            ),
        },
    }
}

LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"pgreplica": {"handlers": ["console"], "level": "WARNING"}},
}
