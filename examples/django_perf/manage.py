#!/usr/bin/env python
"""Run the example against a pgreplica local cluster; see README.md."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_perf.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
