"""The environment that turns usage telemetry off in every process the platform starts (``TELEMETRY_OFF``).

Its own module, importing nothing, so that what only needs these settings (the test suite's configuration, which
also runs on the GPU machine without the service's packages) does not import the local stack and the service."""

# Usage telemetry off in every process of the stack (a value the user set is kept): the platform sends nothing about
# its users' runs anywhere, and MLflow 3.17's telemetry client sets and unsets an environment variable from its own
# thread, which races urllib reading os.environ in another ("API request ... failed with exception
# '_MLFLOW_TELEMETRY_SESSION_ID'", seen on a machine without a CI variable, where its telemetry is on).
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
