"""Customers: a CRM extract, deduplicated, segmented and scored."""

import statistics

import dagster as dg


class CrmConfig(dg.Config):
    region: str = "eu"
    limit: int = 500


@dg.asset(group_name="customers", kinds={"python"})
def crm_customers(config: CrmConfig) -> list[dict]:
    return [{"id": i, "region": config.region, "spend": (i * 37) % 101}
            for i in range(config.limit)]


@dg.asset(group_name="customers")
def unique_customers(crm_customers: list[dict]) -> list[dict]:
    return list({c["id"]: c for c in crm_customers}.values())


@dg.asset(group_name="customers")
def customer_segments(unique_customers: list[dict]) -> dict[str, int]:
    median = statistics.median(c["spend"] for c in unique_customers)
    high = sum(1 for c in unique_customers if c["spend"] > median)
    return {"high": high, "low": len(unique_customers) - high}


@dg.asset(group_name="customers", code_version="2")
def customer_scores(unique_customers: list[dict]) -> dict[int, float]:
    return {c["id"]: c["spend"] / 100 for c in unique_customers}


@dg.asset_check(asset=customer_segments)
def segments_not_empty(customer_segments: dict[str, int]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=sum(customer_segments.values()) > 0,
                               metadata={"total": sum(customer_segments.values())})


customers_job = dg.define_asset_job("customers_refresh",
                                    selection=dg.AssetSelection.groups("customers"))
customers_schedule = dg.ScheduleDefinition(job=customers_job, cron_schedule="15 * * * *",
                                           default_status=dg.DefaultScheduleStatus.STOPPED)
