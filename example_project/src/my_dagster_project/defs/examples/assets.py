"""Two assets persisted to S3 by the S3 pickle IO manager, and a job that materialises them.

Each materialisation writes s3://<bucket>/dagster/<asset key>; the downstream asset reads its
input from there, possibly on another worker.
"""

import statistics

import dagster as dg


@dg.asset(group_name="examples")
def raw_numbers() -> list[int]:
    return [n * n % 97 for n in range(1, 201)]


@dg.asset(group_name="examples")
def number_stats(context: dg.AssetExecutionContext, raw_numbers: list[int]) -> dict[str, float]:
    stats = {
        "count": float(len(raw_numbers)),
        "mean": statistics.fmean(raw_numbers),
        "max": float(max(raw_numbers)),
    }
    context.add_output_metadata({"mean": stats["mean"]})
    return stats


asset_pipeline = dg.define_asset_job(
    "asset_pipeline",
    selection=dg.AssetSelection.groups("examples"),
    description="Materialise the example assets to S3 through taskiq workers.",
)
