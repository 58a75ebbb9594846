"""Prefect tasks: thin wrappers that call the library's pipeline steps."""
