"""Readers: checkpoint headers and bytes (local directories, Hub repos) and data files."""
