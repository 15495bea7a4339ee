"""Inventory: stock levels per warehouse (static partitions) and a reorder list."""

import dagster as dg

warehouses = dg.StaticPartitionsDefinition(["north", "south", "east", "west"])


@dg.asset(group_name="inventory", partitions_def=warehouses)
def stock_levels(context: dg.AssetExecutionContext) -> dict[str, int]:
    seed = sum(map(ord, context.partition_key))
    return {f"sku-{i}": (seed * i) % 40 for i in range(30)}


@dg.asset(group_name="inventory", partitions_def=warehouses)
def low_stock(stock_levels: dict[str, int]) -> list[str]:
    return sorted(sku for sku, count in stock_levels.items() if count < 5)


@dg.asset(group_name="inventory",
          ins={"low_stock": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())})
def reorder_list(low_stock: dict[str, list[str]]) -> list[str]:
    return sorted({sku for skus in low_stock.values() for sku in skus})


@dg.asset(group_name="inventory", deps=[reorder_list])
def supplier_export() -> None:
    """Sends the reorder list to the suppliers' portal (no output kept)."""


@dg.asset_check(asset=reorder_list)
def reorder_list_bounded(reorder_list: list[str]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=len(reorder_list) < 1000)


inventory_job = dg.define_asset_job("inventory_refresh", partitions_def=warehouses,
                                    selection=dg.AssetSelection.groups("inventory")
                                    - dg.AssetSelection.assets(reorder_list, supplier_export))


@dg.schedule(job=inventory_job, cron_schedule="30 5 * * *",
             default_status=dg.DefaultScheduleStatus.STOPPED)
def inventory_schedule() -> list[dg.RunRequest]:
    return [dg.RunRequest(partition_key=key, run_key=key)
            for key in warehouses.get_partition_keys()]
