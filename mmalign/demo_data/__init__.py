"""Builders of demo data sets from offline sources, and helpers to write shards from Python."""
