"""`UnlearnResult`: what an unlearn run did, shared by the two-stage run and the one pass."""

from __future__ import annotations

from dataclasses import dataclass

from perta_stream.sources.input_location import hub_summary

__all__ = ["UnlearnResult"]


@dataclass(frozen=True)
class UnlearnResult:
    """What `run_unlearn` did.

    Attributes:
        outputs: the merged checkpoints, one per α (empty for a dry run).
        stats_dir: the statistics directory used (None for tv and uniform).
        stats_reused: True when an existing statistics directory matched, False when computed,
            None when the method needs none.
        plan_text: what a dry run would do, else None.
        stats_s, merge_s, elapsed_s: wall time per stage and in total.
        peak_rss_bytes: the merge's peak resident memory.
        one_pass: statistics and merge ran as one sweep (`stats_s` is then the whole run).
        resumed: what an interrupted run's folders gave this one (kept shards), one line each.
        fgt_dir, fgt_reused, fgt_s: θ_fgt made from `--model` (None when it was given).
        eval_table, eval_table_path, eval_s: the before/after evaluation (None without one).
    """

    outputs: tuple[str, ...]
    stats_dir: str | None
    stats_reused: bool | None
    plan_text: str | None
    stats_s: float
    merge_s: float
    elapsed_s: float
    peak_rss_bytes: int
    one_pass: bool = False
    hub_inputs: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()
    fgt_dir: str | None = None
    fgt_reused: bool | None = None
    fgt_s: float = 0.0
    eval_table: str | None = None
    eval_table_path: str | None = None
    eval_s: float = 0.0

    def summary(self) -> str:
        parts = [f"resumed: {'; '.join(self.resumed)}"] if self.resumed else []
        if self.fgt_dir is not None:
            parts.append(f"reused theta_fgt {self.fgt_dir}" if self.fgt_reused else f"made theta_fgt {self.fgt_dir} in {self.fgt_s:.1f} s")
        parts.append(self._merge_summary())
        if self.eval_table_path is not None:
            parts.append(f"evaluated before and after in {self.eval_s:.1f} s ({self.eval_table_path})")
        return "; ".join(parts) + f" (total {self.elapsed_s:.1f} s)"

    def _merge_summary(self) -> str:
        if self.one_pass:
            saved = f"; statistics saved to {self.stats_dir}" if self.stats_dir else ""
            return f"one pass: statistics and merge into {', '.join(self.outputs)} in {self.stats_s:.1f} s{saved}{hub_summary(self.hub_inputs)}"
        if self.stats_reused is None:
            stats_text = "no statistics needed"
        elif self.stats_reused:
            stats_text = f"reused statistics {self.stats_dir}"
        else:
            stats_text = f"computed statistics into {self.stats_dir} in {self.stats_s:.1f} s"
        return f"{stats_text}; merged {', '.join(self.outputs)} in {self.merge_s:.1f} s{hub_summary(self.hub_inputs)}"
