"""Example jobs, each launchable from the Dagster UI (Jobs tab). Delete this folder when done."""
