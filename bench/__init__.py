"""Benchmarks run by `odl bench <name>`."""
