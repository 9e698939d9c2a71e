"""Frozen, validated configuration dataclasses, one module per pipeline."""
