"""A job whose step fails on its first attempt and succeeds when Dagster retries it."""

import dagster as dg


@dg.op(retry_policy=dg.RetryPolicy(max_retries=2, delay=1))
def flaky_step(context: dg.OpExecutionContext) -> str:
    if context.retry_number == 0:
        # A stand-in for a transient error (network blip, throttling...).
        raise RuntimeError("Simulated transient failure on the first attempt.")
    message = f"Succeeded on attempt {context.retry_number + 1}."
    context.log.info(message)
    return message


@dg.job(description="Fails once, then succeeds: the retry is sent to a worker again.")
def retry_once() -> None:
    flaky_step()
