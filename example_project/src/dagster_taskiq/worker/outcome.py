"""What a task's process reports: its outcome, a JSON-able dict."""

from __future__ import annotations

import sys
from typing import Any

from dagster._serdes import serialize_value
from dagster._utils.error import serializable_error_info_from_exc_info

StepOutcome = dict[str, Any]
"""``{"events": [serialized DagsterEvent, ...], "error": serialized SerializableErrorInfo | None,
"crashed": bool}``: ``error`` is an exception in the worker outside the step's own handling;
``crashed`` means the step's process died (signal, ``os._exit``) before it could answer;
``skipped`` (when present) why the step was not run at all (its run had already ended)."""


def error_outcome(events: list[str] | None = None) -> StepOutcome:
    """The outcome for an exception being handled now (call from an ``except`` block)."""
    error = serializable_error_info_from_exc_info(sys.exc_info())
    return {"events": events or [], "error": serialize_value(error), "crashed": False}
