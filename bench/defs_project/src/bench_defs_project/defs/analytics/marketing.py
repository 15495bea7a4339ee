"""Marketing: campaign spend from a multi-asset extract, attribution, and a sensor-driven job."""

import dagster as dg


@dg.multi_asset(group_name="marketing", specs=[
    dg.AssetSpec("campaigns", description="Campaigns as listed by the ad platform."),
    dg.AssetSpec("ad_spend", description="Spend per campaign per day."),
])
def ad_platform_extract():
    campaigns = [{"id": i, "channel": ("search", "social", "video")[i % 3]} for i in range(12)]
    yield dg.MaterializeResult(asset_key="campaigns", metadata={"rows": len(campaigns)})
    yield dg.MaterializeResult(asset_key="ad_spend", metadata={"rows": 12 * 30})


@dg.asset(group_name="marketing", deps=["campaigns", "ad_spend"])
def attribution() -> dict[str, float]:
    return {"search": 0.5, "social": 0.3, "video": 0.2}


@dg.asset(group_name="marketing")
def channel_roi(attribution: dict[str, float]) -> dict[str, float]:
    return {channel: share * 3.1 for channel, share in attribution.items()}


@dg.asset_check(asset=attribution)
def attribution_sums_to_one(attribution: dict[str, float]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=abs(sum(attribution.values()) - 1) < 1e-9)


marketing_job = dg.define_asset_job("marketing_refresh",
                                    selection=dg.AssetSelection.groups("marketing"))
marketing_schedule = dg.ScheduleDefinition(job=marketing_job, cron_schedule="0 7 * * 1",
                                           default_status=dg.DefaultScheduleStatus.STOPPED)


@dg.sensor(job=marketing_job, minimum_interval_seconds=600,
           default_status=dg.DefaultSensorStatus.STOPPED)
def new_campaign_export(context: dg.SensorEvaluationContext):
    cursor = int(context.cursor or 0)
    context.update_cursor(str(cursor + 1))
    return dg.SkipReason("no new export")
