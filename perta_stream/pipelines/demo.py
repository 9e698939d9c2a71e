"""`run_demo`: the whole PerTA story on a tiny Llama and the bundled TOFU data, on CPU, offline.

Recipe, top to bottom (each step is cached under `<cache>/models-<key>/`, so a second run only
prints; a step interrupted halfway is redone):
1. data: θ_0's text (real-author and world-fact QA), the forget split, part of retain90;
2. tokenizer: byte-level BPE trained on the bundled TOFU text; a random-init Llama (`init/`);
3. θ_0 = init fine-tuned on the real-author and world-fact QA (knows nothing of the TOFU authors);
4. θ_full (forget + retain), θ_fgt (forget), θ_ret (retain) = θ_0 fine-tuned with `finetune`
   (`--lora R`: θ_fgt a LoRA adapter, `fgt-lora<R>/`, which the sweep reads as θ_fgt);
5. gradient statistics at θ_0 (`stats`), grad and fisher;
6. the sweep: every method at every α, evaluated on TOFU, table + JSON + trade-off plot.
`<cache>/current` points at the latest build, so `configs/demo_*.yaml` can name its models, and
the report and its plot are copied to the top of the cache folder: `<cache>/demo.md` beside
`<cache>/tradeoff.png`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from perta_stream.config.demo import DemoConfig
from perta_stream.demo.recipe import DemoRecipe
from perta_stream.sinks.atomic_file import write_bytes_atomically, write_text_atomically
from perta_stream.sinks.output_dir import partial_path
from perta_stream.sinks.report import SweepRow, best_forget_quality, compare_at_matched_forgetting, format_markdown_table

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

CURRENT_LINK = "current"
REPORT_NAME = "demo.md"
PLOT_NAME = "tradeoff.png"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` built and found.

    Attributes:
        build_dir: the cached models, data and tokenizer of this recipe.
        sweep_dir: the sweep's folder (table, JSON record, plot, per-model evaluations).
        rows: the evaluated models (full and retain references, then every merge).
        table: the Markdown table.
        plot_path: the trade-off plot, `<cache>/tradeoff.png` (a copy of the sweep's).
        report_path: `<cache>/demo.md`, what the demo prints, beside the plot.
        stage_s: wall seconds per stage (0 when it came from the cache).
        cached: the stages taken from the cache.
        elapsed_s: wall time of the whole run.
    """

    build_dir: Path
    sweep_dir: Path
    rows: tuple[SweepRow, ...]
    table: str
    plot_path: Path
    report_path: Path
    stage_s: dict[str, float]
    cached: tuple[str, ...]
    elapsed_s: float

    def report(self) -> str:
        """What the demo prints: the table, the matched-forgetting reading of it, and the paths."""
        lines = [
            "PerTA demo: a tiny Llama on TOFU, unlearned by task arithmetic (tv), uniform W, PerTA-grad and PerTA-fisher.",
            "Reference rows: `full` is the model to clean (trained on forget + retain), `retain` never saw the forget set.",
            "",
            self.table.rstrip(),
            "",
            "At matched forgetting (tv's utility interpolated at each point's forget quality; positive = keeps more utility than tv):",
        ]
        lines += [f"  {line}" for line in compare_at_matched_forgetting(list(self.rows))]
        lines += ["", "Highest forget quality each method reaches (1 = indistinguishable from the retain model):"]
        lines += [f"  {line}" for line in best_forget_quality(list(self.rows))]
        lines += [
            "",
            f"plot:  {self.plot_path}   (this report: {self.report_path})",
            f"sweep: {self.sweep_dir / 'sweep.md'}   record: {self.sweep_dir / 'sweep.json'}",
            f"models: {self.build_dir}  (also {self.build_dir.parent / CURRENT_LINK})",
            f"time: {self.elapsed_s:.0f} s" + (f" (from cache: {', '.join(self.cached)})" if self.cached else ""),
        ]
        return "\n".join(lines)


def run_demo(config: DemoConfig, *, on_stage: Callable[[str], None] | None = None) -> DemoResult:
    """Build (or reuse) everything of `config.recipe` and run the sweep.

    Args:
        config: the demo's options and recipe.
        on_stage: called with a line when a stage starts and when it ends (the CLI prints them).

    Raises:
        PertaStreamError subclasses from the stages (a broken bundled file, an unwritable cache).
    """
    import torch
    from transformers.utils import logging as transformers_logging

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    # The demo loads and saves dozens of tiny checkpoints; transformers' per-file bars would bury
    # the stage lines and perta_stream's own bars, so they are off for the run and restored after.
    hub_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return _run_demo(config, on_stage or (lambda line: None))
    finally:
        torch.set_num_threads(previous_threads)
        if hub_bars:
            transformers_logging.enable_progress_bar()


def _run_demo(config: DemoConfig, on_stage: Callable[[str], None]) -> DemoResult:
    from perta_stream.sources.tofu import bundled_tofu_dir

    started = time.perf_counter()
    recipe = config.recipe
    tofu_dir = bundled_tofu_dir()
    cache = Path(config.cache_dir)
    build = cache / f"models-{recipe.models_key(_data_digest(tofu_dir))}"
    if config.rebuild and build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True, exist_ok=True)
    _point_current(cache, build)

    stage_s: dict[str, float] = {}
    cached: list[str] = []

    def stage(name: str, target: Path, make: Callable[[], object]) -> None:
        if target.exists():
            cached.append(name)
            stage_s[name] = 0.0
            return
        shutil.rmtree(partial_path(target), ignore_errors=True)  # left by an interrupted run
        stage_started = time.perf_counter()
        on_stage(f"[demo] {name} ...")
        make()
        stage_s[name] = time.perf_counter() - stage_started
        on_stage(f"[demo] {name}: {stage_s[name]:.1f} s")

    data_dir, init_dir = build / "data", build / "init"
    stage("data + tokenizer + init", init_dir, lambda: _make_base(recipe, tofu_dir, data_dir, init_dir))
    stage("theta0 (real authors + world facts)", build / "theta0", lambda: _finetune(config, init_dir, data_dir / "pretrain.jsonl", build / "theta0", recipe.pretrain_epochs, recipe.pretrain_lr))
    for name, data_file in (("full", "full.jsonl"), (recipe.fgt_name, "forget.jsonl"), ("ret", "retain.jsonl")):
        lora_rank = recipe.lora_rank if name == recipe.fgt_name else None
        stage(
            f"theta_{name}" if lora_rank is None else f"theta_fgt (rank-{lora_rank} LoRA)",
            build / name,
            lambda data_file=data_file, name=name, lora_rank=lora_rank: _finetune(
                config, build / "theta0", data_dir / data_file, build / name, recipe.finetune_epochs, recipe.finetune_lr, lora_rank=lora_rank
            ),
        )
    stats_key = recipe.stats_key(build.name)
    stats_dir = build / f"stats-{stats_key}"
    stage("stats (grad, fisher at theta0)", stats_dir, lambda: _stats(config, build, data_dir, stats_dir))
    sweep_dir = build / f"sweep-{recipe.sweep_key(stats_key)}"
    stage("sweep (merge + evaluate)", sweep_dir, lambda: _sweep(config, build, stats_dir, sweep_dir))

    from perta_stream.sinks.report import read_sweep_rows, sort_rows

    rows = tuple(sort_rows(read_sweep_rows(sweep_dir / "sweep.json")))
    result = DemoResult(
        build_dir=build,
        sweep_dir=sweep_dir,
        rows=rows,
        table=format_markdown_table(rows),
        plot_path=cache / PLOT_NAME,
        report_path=cache / REPORT_NAME,
        stage_s=stage_s,
        cached=tuple(cached),
        elapsed_s=time.perf_counter() - started,
    )
    # The report and its plot at the top of the cache folder, side by side: the build's folder name is a hash.
    write_bytes_atomically(result.plot_path, (sweep_dir / PLOT_NAME).read_bytes())
    write_text_atomically(result.report_path, result.report() + "\n")
    return result


def _make_base(recipe: DemoRecipe, tofu_dir: Path, data_dir: Path, init_dir: Path) -> None:
    from perta_stream.demo.data import tokenizer_corpus, write_demo_data
    from perta_stream.demo.model import build_demo_model, save_checkpoint
    from perta_stream.demo.tokenizer import train_demo_tokenizer

    write_demo_data(tofu_dir, recipe.split, recipe.retain_count, data_dir)
    tokenizer = train_demo_tokenizer(tokenizer_corpus(tofu_dir), vocab_size=recipe.vocab_size)
    model = build_demo_model(tokenizer, recipe.shape, seed=recipe.model_seed)
    partial = partial_path(init_dir)
    save_checkpoint(model, tokenizer, partial)
    os.replace(partial, init_dir)


def _finetune(config: DemoConfig, model: Path, data: Path, out: Path, epochs: int, lr: float, *, lora_rank: int | None = None) -> None:
    from perta_stream.config.finetune import FinetuneConfig
    from perta_stream.pipelines.finetune import run_finetune

    recipe = config.recipe
    result = run_finetune(
        FinetuneConfig(
            model=str(model),
            data=str(data),
            out=str(out),
            epochs=epochs,
            lr=lr,
            batch_size=recipe.batch_size,
            max_length=recipe.max_length,
            seed=recipe.train_seed,
            device=config.device,
            lora_rank=lora_rank,
        )
    )
    logger.info("%s", result.summary())


def _stats(config: DemoConfig, build: Path, data_dir: Path, out: Path) -> None:
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    recipe = config.recipe
    result = run_stats(
        StatsConfig(
            model=str(build / "theta0"),
            forget=str(data_dir / "forget.jsonl"),
            retain=str(data_dir / "retain.jsonl"),
            out=str(out),
            kinds=("grad", "fisher"),
            fraction=recipe.stats_fraction,
            max_length=recipe.max_length,
            batch_size=recipe.batch_size,
            device=config.device,
        )
    )
    logger.info("%s", result.summary())


def _sweep(config: DemoConfig, build: Path, stats_dir: Path, out: Path) -> None:
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.pipelines.sweep import run_sweep

    recipe = config.recipe
    result = run_sweep(
        SweepConfig(
            theta0=str(build / "theta0"),
            full=str(build / "full"),
            fgt=str(build / recipe.fgt_name),
            out=str(out),
            stats=str(stats_dir),
            retain_model=str(build / "ret"),
            split=recipe.split,
            methods=recipe.methods,
            alphas=recipe.alphas,
            eval_batch_size=recipe.eval_batch_size,
            max_length=recipe.max_length,
            max_new_tokens=recipe.max_new_tokens,
            max_items=recipe.eval_max_items,
            device=config.device,
            title=f"PerTA demo: tiny Llama, TOFU {recipe.split}" + ("" if recipe.lora_rank is None else f", theta_fgt a rank-{recipe.lora_rank} LoRA"),
        )
    )
    logger.info("%s", result.summary())


def _data_digest(tofu_dir: Path) -> str:
    """One hash over the bundled TOFU files (a changed file invalidates the cache)."""
    from perta_stream.hashing import file_sha256

    digest = hashlib.sha256()
    for path in sorted(tofu_dir.glob("*.jsonl")):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _point_current(cache: Path, build: Path) -> None:
    """Make `<cache>/current` a symlink to `build` (replaced atomically)."""
    link = cache / CURRENT_LINK
    temporary = cache / f".{CURRENT_LINK}.{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(build.name, temporary)
        os.replace(temporary, link)
    except OSError as exc:  # a filesystem without symlinks: the configs then need the full path
        logger.info("cannot link %s to %s (%s)", link, build, exc)
