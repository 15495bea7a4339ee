"""Orders: daily-partitioned raw orders, cleaned, aggregated; a freshness-style check."""

import dagster as dg

daily = dg.DailyPartitionsDefinition(start_date="2026-01-01")


@dg.asset(group_name="orders", partitions_def=daily, kinds={"python"},
          description="Orders as exported by the shop, one partition a day.")
def raw_orders(context: dg.AssetExecutionContext) -> list[dict]:
    day = context.partition_key
    return [{"id": f"{day}-{i}", "amount": i * 3 % 17, "customer": i % 11} for i in range(50)]


@dg.asset(group_name="orders", partitions_def=daily)
def clean_orders(raw_orders: list[dict]) -> list[dict]:
    return [order for order in raw_orders if order["amount"] > 0]


@dg.asset(group_name="orders", partitions_def=daily,
          metadata={"owner": "sales-data", "sla_hours": 6})
def order_totals(clean_orders: list[dict]) -> dict[str, float]:
    return {"count": len(clean_orders), "amount": float(sum(o["amount"] for o in clean_orders))}


@dg.asset(group_name="orders", deps=[order_totals],
          automation_condition=dg.AutomationCondition.eager())
def orders_dashboard() -> None:
    """Refreshes the dashboard after the day's totals (no output kept)."""


@dg.asset_check(asset=clean_orders, blocking=True)
def clean_orders_have_ids(clean_orders: list[dict]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=all(o.get("id") for o in clean_orders))


orders_job = dg.define_asset_job("orders_daily", selection=dg.AssetSelection.groups("orders"),
                                 partitions_def=daily)
orders_schedule = dg.build_schedule_from_partitioned_job(orders_job, hour_of_day=2)
