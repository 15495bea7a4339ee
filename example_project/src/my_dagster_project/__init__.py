"""A Dagster code location whose steps run on taskiq workers over Redis."""
