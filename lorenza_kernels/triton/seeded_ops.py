"""Triton seeded ops (in progress)."""
