"""The larger end-to-end run of issue 4: TOFU forget10, a bigger Llama, more training (not in CI).

It runs the demo's recipe at a larger scale (the same code path as `perta-stream demo`), and
writes benchmarks/results/tofu_forget10.{json,md,png}: the sweep's table and trade-off plot, the
matched-forgetting comparison against task arithmetic, the recipe, and the time of every stage.

The claim under test (the paper's): at a matched forgetting level, PerTA-fisher and PerTA-grad keep
more model utility than task arithmetic, with forget quality at least as good.

    flock /tmp/perta_bench.lock .venv/bin/python benchmarks/bench_tofu_forget10.py

Built models are cached under benchmarks/work/tofu_forget10/ (delete it, or pass --rebuild, to
measure a fresh run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, write_results  # noqa: E402

from perta_stream.config.demo import DemoConfig  # noqa: E402
from perta_stream.demo.model import DemoModelShape  # noqa: E402
from perta_stream.demo.recipe import DemoRecipe  # noqa: E402
from perta_stream.pipelines.demo import run_demo  # noqa: E402
from perta_stream.sinks.report import TABLE_COLUMNS, compare_at_matched_forgetting  # noqa: E402

NAME = "tofu_forget10"
WORK_DIR = Path(__file__).resolve().parent / "work" / NAME

# 1.5x the demo's width (about twice its parameters), forget10 (20 authors, 400 QA) and 400 retain
# records, 60 evaluated items per set; uniform is left out (uniform W=0.5 at alpha is exactly tv at
# alpha/2, the demo's table shows it). Sized to finish in about half an hour on 2 shared CPU cores.
RECIPE = DemoRecipe(
    split="forget10",
    retain_count=400,
    vocab_size=4096,
    shape=DemoModelShape(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512),
    pretrain_epochs=30,
    pretrain_lr=1e-3,
    finetune_epochs=12,
    finetune_lr=1e-3,
    batch_size=16,
    max_length=256,
    methods=("tv", "grad", "fisher"),
    alphas=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    eval_max_items=60,
    max_new_tokens=48,
    eval_batch_size=32,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild everything (a fresh, fully timed run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()

    started = time.perf_counter()
    result = run_demo(DemoConfig(cache_dir=str(WORK_DIR), rebuild=args.rebuild, device=args.device, recipe=RECIPE), on_stage=lambda line: print(line, file=sys.stderr, flush=True))
    wall_s = time.perf_counter() - started
    print(result.report())

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot_path = RESULTS_DIR / f"{NAME}.png"
    shutil.copyfile(result.plot_path, plot_path)
    comparison = compare_at_matched_forgetting(list(result.rows))
    table_rows = [
        {
            "model": row.label,
            **{title: row.metrics.get(key, float("nan")) for key, title, _ in TABLE_COLUMNS},
        }
        for row in result.rows
    ]
    record = {
        "benchmark": NAME,
        "command": "flock /tmp/perta_bench.lock .venv/bin/python benchmarks/bench_tofu_forget10.py" + (" --rebuild" if args.rebuild else ""),
        "recipe": RECIPE.to_dict(),
        "device": args.device,
        "wall_s": wall_s,
        "stage_s": result.stage_s,
        "cached_stages": list(result.cached),
        "rows": [row.to_dict() for row in result.rows],
        "matched_forgetting": comparison,
        "plot": str(plot_path.relative_to(RESULTS_DIR.parent.parent)),
        "machine": machine_info(),
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    notes = [
        f"command: `{record['command']}`",
        f"wall time {wall_s:.0f} s on {record['machine']['cpu_count']} CPU cores"
        + (f" (stages from cache: {', '.join(result.cached)})" if result.cached else " (nothing cached)"),
        "stage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.stage_s.items()),
        f"plot: {record['plot']}",
        "matched forgetting vs tv: " + " / ".join(comparison),
    ]
    write_results(NAME, record, table_rows, title="TOFU forget10, Llama 4x192, tv vs PerTA-grad vs PerTA-fisher", notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
