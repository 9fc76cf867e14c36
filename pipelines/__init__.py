"""Prefect flows over the bertscale library: one per stage, and one that chains them all."""

import os

# Defaults for Prefect's ephemeral server, set before Prefect is imported (explicit settings win):
# - its first start on a fresh machine creates and migrates the SQLite database, which took more than Prefect's
#   20 s start-up limit on a busy 2-core machine and failed the whole run;
# - its usage telemetry only logs errors on a machine without internet access.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
