"""TOFU evaluation: one small function per metric (metrics), answer scoring and generation
(scoring), the per-set runner (runner) and the JSON/Markdown record (report)."""
