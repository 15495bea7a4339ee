"""The smallest job: one step, run by a worker on the default queue."""

import socket

import dagster as dg


@dg.op
def say_hello(context: dg.OpExecutionContext) -> str:
    message = f"Hello from a taskiq worker on {socket.gethostname()}!"
    context.log.info(message)
    return message


@dg.job(description="One step on the default queue: check that a worker picks it up.")
def hello() -> None:
    say_hello()


# Off until switched on in the UI (Automation): the daemon then launches hello every morning.
hello_every_morning = dg.ScheduleDefinition(
    job=hello, cron_schedule="0 6 * * *", default_status=dg.DefaultScheduleStatus.STOPPED
)
