"""Finance: an ops-based ledger close (config, retries, a resource) and revenue assets."""

import dagster as dg


class LedgerConfig(dg.Config):
    period: str = "2026-11"
    currency: str = "EUR"


class FxRates(dg.ConfigurableResource):
    base: str = "EUR"

    def rate(self, currency: str) -> float:
        return 1.0 if currency == self.base else 1.08


@dg.op(retry_policy=dg.RetryPolicy(max_retries=2, delay=5))
def fetch_ledger(config: LedgerConfig) -> list[float]:
    return [float(i % 13) for i in range(100)]


@dg.op
def convert(ledger: list[float], fx: FxRates) -> list[float]:
    return [amount * fx.rate("USD") for amount in ledger]


@dg.op(out={"total": dg.Out(float), "count": dg.Out(int)})
def summarise(converted: list[float]):
    return sum(converted), len(converted)


@dg.op
def post_close(total: float, count: int) -> None:
    """Posts the closing entry (nothing kept)."""


@dg.job(description="Close the month's ledger.", resource_defs={"fx": FxRates()})
def ledger_close() -> None:
    total, count = summarise(convert(fetch_ledger()))
    post_close(total, count)


ledger_close_schedule = dg.ScheduleDefinition(job=ledger_close, cron_schedule="0 3 1 * *",
                                              default_status=dg.DefaultScheduleStatus.STOPPED)


@dg.asset(group_name="finance")
def revenue() -> float:
    return 1234.5


@dg.asset(group_name="finance")
def margin(revenue: float) -> float:
    return revenue * 0.31


@dg.asset(group_name="finance")
def forecast(revenue: float, margin: float) -> dict[str, float]:
    return {"revenue": revenue * 1.05, "margin": margin * 1.02}


@dg.asset(group_name="finance", deps=[forecast])
def board_pack() -> None:
    """Renders the board pack (no output kept)."""


@dg.asset_check(asset=margin)
def margin_positive(margin: float) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=margin > 0)
