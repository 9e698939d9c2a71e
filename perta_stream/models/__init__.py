"""Recipes that make real pretrained checkpoints available offline (`perta-stream models fetch`)."""
