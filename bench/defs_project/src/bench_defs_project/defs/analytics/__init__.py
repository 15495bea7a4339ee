"""Unrelated code of the same location (never run by the benchmark): what a real project's defs
folder also holds, so that loading the folder costs what it costs in a real project."""
