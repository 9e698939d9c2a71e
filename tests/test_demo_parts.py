"""The demo's building blocks: tokenizer, model builder, recipe hashing, report and plot writing."""

from __future__ import annotations

import json
import math

import pytest

from perta_stream.compute.prompts import IGNORE_INDEX, encode_sample
from perta_stream.demo.model import DemoModelShape, build_demo_model, save_checkpoint
from perta_stream.demo.tokenizer import EOS_TOKEN, PAD_TOKEN, train_demo_tokenizer
from perta_stream.errors import UsageError
from perta_stream.sinks.plot import write_tradeoff_plot
from perta_stream.sinks.report import (
    MERGE,
    REFERENCE,
    SweepRow,
    format_markdown_table,
    format_metric,
    read_sweep_rows,
    row_label,
    write_sweep_report,
)

TEXTS = [
    "Who wrote the novel Pride and Prejudice?",
    "Jane Austen wrote Pride and Prejudice, published in 1813.",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Émile Zola was a French novelist — naturalism's leading figure.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_demo_tokenizer(TEXTS, vocab_size=320)


def test_tokenizer_round_trips_text_and_has_special_tokens(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer) <= 320
    # Byte-level BPE: text never seen in training (accents, digits) still round-trips exactly.
    for text in ("The capital of France is Paris.", " Ørsted, 1777–1851!"):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("What is the capital?")["input_ids"] == tokenizer("What is the capital?")["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert not getattr(reloaded, "chat_template", None)


def test_tokenizer_training_is_deterministic(tokenizer):
    again = train_demo_tokenizer(TEXTS, vocab_size=320)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_encodes_plain_prompt_with_answer_only_labels(tokenizer):
    sample = encode_sample(tokenizer, "What is the capital of France?", "Paris.", max_length=64)
    answer_ids = [token for token, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_ids[:-1]) == " Paris."


def test_tokenizer_rejects_bad_input():
    with pytest.raises(UsageError, match="vocab_size"):
        train_demo_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(UsageError, match="no text"):
        train_demo_tokenizer(["", ""], vocab_size=320)


def test_model_builder_is_seeded_tied_and_saves_safetensors(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    shape = DemoModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model_a = build_demo_model(tokenizer, shape, seed=3)
    model_b = build_demo_model(tokenizer, shape, seed=3)
    model_c = build_demo_model(tokenizer, shape, seed=4)
    state_a, state_b, state_c = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(state_a[name], state_b[name]) for name in state_a)
    assert not torch.equal(state_a["model.embed_tokens.weight"], state_c["model.embed_tokens.weight"])
    assert model_a.config.vocab_size == len(tokenizer)
    assert model_a.lm_head.weight.data_ptr() == model_a.model.embed_tokens.weight.data_ptr()

    save_checkpoint(model_a, tokenizer, tmp_path / "ckpt")
    names = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(state_a[name], reloaded_state[name]) for name in state_a)


def test_model_builder_leaves_global_rng_alone(tokenizer):
    import torch

    shape = DemoModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_demo_model(tokenizer, shape, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_model_shape_problems_are_all_reported(tokenizer):
    shape = DemoModelShape(hidden_size=30, num_attention_heads=4, num_key_value_heads=3, num_hidden_layers=0)
    problems = shape.problems()
    assert len(problems) == 3
    with pytest.raises(UsageError, match="num_hidden_layers"):
        build_demo_model(tokenizer, shape, seed=0)


def _rows() -> list[SweepRow]:
    rows = [
        SweepRow(label="retain", kind=REFERENCE, metrics={"forget_quality": 1.0, "model_utility": 0.40, "forget_rouge_l": 0.2}),
        SweepRow(label="full", kind=REFERENCE, metrics={"forget_quality": 3.1e-6, "model_utility": 0.45, "forget_rouge_l": 0.9}),
    ]
    for method, utility_drop in (("fisher", 0.05), ("tv", 0.1)):
        for alpha in (2.0, 0.5, 1.0):
            rows.append(
                SweepRow(
                    label=row_label(method, alpha),
                    kind=MERGE,
                    method=method,
                    alpha=alpha,
                    metrics={"forget_quality": 10 ** (-6 + 2 * alpha), "model_utility": 0.45 - utility_drop * alpha, "forget_rouge_l": float("nan")},
                )
            )
    return rows


def test_markdown_table_orders_rows_and_formats_cells():
    table = format_markdown_table(_rows()).splitlines()
    assert table[0].startswith("| model | method | α | forget quality")
    assert len(table) == 2 + 8
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels == ["retain", "full", "fisher α=0.5", "fisher α=1", "fisher α=2", "tv α=0.5", "tv α=1", "tv α=2"]
    full_cells = [cell.strip() for cell in table[3].split("|")[1:-1]]
    assert full_cells[:5] == ["full", "—", "—", "3.10e-06", "0.450"]
    assert "—" in table[4]  # NaN ROUGE-L shows as a dash


def test_format_metric():
    assert format_metric(0.5, "sci") == "0.500"
    assert format_metric(1.234e-7, "sci") == "1.23e-07"
    assert format_metric(None, "fixed") == "—"
    assert format_metric(float("nan"), "fixed") == "—"


def test_sweep_report_json_round_trips_and_nan_becomes_null(tmp_path):
    rows = _rows()
    write_sweep_report(rows, table_path=tmp_path / "sweep.md", json_path=tmp_path / "sweep.json", record={"format": "perta_sweep"})
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["format"] == "perta_sweep"
    assert data["rows"][2]["metrics"]["forget_rouge_l"] is None
    back = read_sweep_rows(tmp_path / "sweep.json")
    assert [row.label for row in back][:2] == ["retain", "full"]
    assert back[2].alpha == 0.5 and math.isnan(back[2].metrics["forget_rouge_l"])
    assert (tmp_path / "sweep.md").read_text() == format_markdown_table(rows)
    assert not list(tmp_path.glob(".*tmp*"))


def test_tradeoff_plot_writes_a_png_with_one_curve_per_method(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    captured = {}
    original_close = plt.close

    def keep_figure(figure=None):
        captured["figure"] = figure
        return original_close(figure)

    monkeypatch.setattr(plt, "close", keep_figure)
    rows = _rows() + [SweepRow(label="grad α=1", kind=MERGE, method="grad", alpha=1.0, metrics={"forget_quality": 0.0, "model_utility": 0.3})]
    path = write_tradeoff_plot(rows, tmp_path / "plots" / "tradeoff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = captured["figure"].axes[0]
    assert axes.get_yscale() == "log"
    curves = {line.get_label(): line for line in axes.get_lines()}
    assert set(curves) == {"PerTA-fisher", "task arithmetic (tv)", "PerTA-grad"}
    # Points are in α order: utility falls as α grows for these rows.
    assert list(curves["PerTA-fisher"].get_xdata()) == pytest.approx([0.425, 0.40, 0.35])
    assert list(curves["PerTA-grad"].get_ydata()) == [pytest.approx(1e-30)]  # a zero p-value drawn at the floor
    annotations = sorted(child.get_text() for child in axes.texts)
    assert annotations.count("α=1") == 3
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "full model (reference)" in legend and "retain model (reference)" in legend


def test_alpha_labels_overlap_neither_each_other_nor_a_point():
    from perta_stream.sinks.plot import tradeoff_figure

    # Crowded: three methods whose points nearly coincide at every alpha.
    rows = [
        SweepRow(label=row_label(method, alpha), kind=MERGE, method=method, alpha=alpha,
                 metrics={"forget_quality": 10 ** (-6 + alpha) * (1 + shift), "model_utility": 0.45 - 0.05 * alpha + shift})
        for shift, method in ((0.0, "tv"), (0.002, "grad"), (0.004, "fisher"))
        for alpha in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    ]
    figure, texts = tradeoff_figure(rows)
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer=renderer) for text in texts]
    assert len(boxes) == 18
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            assert not first.overlaps(second), (first, second)


def test_the_right_panel_shows_each_method_against_tv_at_matched_forgetting():
    import matplotlib.pyplot as plt

    from perta_stream.sinks.plot import tradeoff_figure
    from perta_stream.sinks.report import matched_baseline_utility, sort_rows

    rows = _rows()
    figure, _ = tradeoff_figure(rows)
    right = figure.axes[1]
    fisher = next(line for line in right.get_lines() if line.get_label() == "PerTA-fisher")
    # fisher's points lie on tv's forgetting at the same alpha: 0.05 * alpha more utility than tv's.
    expected = [row.metrics["model_utility"] - matched_baseline_utility(rows, row) for row in sort_rows(rows) if row.method == "fisher"]
    assert list(fisher.get_ydata()) == pytest.approx(expected) and expected == pytest.approx([0.025, 0.05, 0.1])
    assert any(line.get_label() == "task arithmetic (tv)" and list(line.get_ydata()) == [0, 0] for line in right.get_lines())
    plt.close(figure)


# ---------------------------------------------------------------- demo recipe, data and the whole run
def test_recipe_keys_change_only_for_the_stages_an_option_affects():
    from dataclasses import replace

    from perta_stream.demo.recipe import DemoRecipe

    base = DemoRecipe()
    models = base.models_key("data")
    assert models == DemoRecipe().models_key("data")  # stable across instances
    assert base.models_key("other data") != models
    wider = replace(base, shape=DemoModelShape(hidden_size=256))
    assert wider.models_key("data") != models
    more_alphas = replace(base, alphas=(0.5, 1.0, 3.0))
    assert more_alphas.models_key("data") == models
    assert more_alphas.stats_key(models) == base.stats_key(models)
    assert more_alphas.sweep_key(base.stats_key(models)) != base.sweep_key(base.stats_key(models))
    assert replace(base, stats_fraction=0.5).stats_key(models) != base.stats_key(models)


def test_demo_config_collects_problems():
    from dataclasses import replace

    from perta_stream.config.demo import DemoConfig
    from perta_stream.demo.recipe import DemoRecipe
    from perta_stream.errors import PlanError

    recipe = replace(DemoRecipe(), split="forget05", retain_count=0, alphas=(), shape=DemoModelShape(hidden_size=30))
    with pytest.raises(PlanError) as caught:
        DemoConfig(recipe=recipe, threads=0, device="tpu")
    assert len(caught.value.problems) == 6


def test_demo_data_keeps_theta0_text_off_the_fictitious_authors(tmp_path):
    from perta_stream.demo.data import tokenizer_corpus, write_demo_data
    from perta_stream.sources.qa_dataset import load_qa_samples, load_records
    from perta_stream.sources.tofu import bundled_tofu_dir

    tofu = bundled_tofu_dir()
    files = write_demo_data(tofu, "forget01", 30, tmp_path)
    pretrain, forget, retain, full = (load_qa_samples(path) for path in (files.pretrain, files.forget, files.retain, files.full))
    assert len(pretrain) == 100 + 117 and len(forget) == 40 and len(retain) == 30 and len(full) == 70
    # θ_0's text shares no question with anything about the TOFU authors.
    tofu_questions = {record["question"] for name in ("forget10.jsonl", "retain90.jsonl") for record in load_records(tofu / name)}
    assert not {sample.question for sample in pretrain} & tofu_questions
    # The retain part is the head of retain_perturbed, the set the evaluation scores.
    evaluated = [record["question"] for record in load_records(tofu / "retain_perturbed.jsonl")[:30]]
    assert [sample.question for sample in retain] == evaluated
    assert [s.question for s in full] == [s.question for s in forget + retain]
    with pytest.raises(UsageError, match="retain_count"):
        write_demo_data(tofu, "forget01", 10**6, tmp_path / "again")
    first = list(tokenizer_corpus(tofu))
    assert first == list(tokenizer_corpus(tofu)) and len(first) > 10_000


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end_and_second_run_is_cached(tmp_path):
    from perta_stream.config.demo import DemoConfig
    from perta_stream.demo.recipe import DemoRecipe
    from perta_stream.pipelines.demo import run_demo

    recipe = DemoRecipe(
        retain_count=4, vocab_size=300,
        shape=DemoModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
        pretrain_epochs=1, finetune_epochs=1, max_length=512, methods=("tv", "fisher"), alphas=(1.0,),
        eval_max_items=2, max_new_tokens=2,
    )
    config = DemoConfig(cache_dir=str(tmp_path / "cache"), recipe=recipe)
    first = run_demo(config)
    assert first.cached == ()
    assert [row.label for row in first.rows] == ["retain", "full", "tv α=1", "fisher α=1"]
    assert first.plot_path.is_file() and (first.sweep_dir / "sweep.json").is_file()
    for name in ("theta0", "full", "fgt", "ret"):
        assert (first.build_dir / name / "model.safetensors").is_file()
    assert (tmp_path / "cache" / "current").resolve() == first.build_dir.resolve()
    report = first.report()
    assert first.table.strip() in report and str(first.plot_path) in report
    # The plot and the report side by side at the top of the cache folder, not under the build's hash.
    assert first.plot_path == tmp_path / "cache" / "tradeoff.png" and first.report_path == tmp_path / "cache" / "demo.md"
    assert first.plot_path.read_bytes() == (first.sweep_dir / "tradeoff.png").read_bytes()
    assert first.report_path.read_text() == report + "\n"

    second = run_demo(config)
    assert len(second.cached) == len(first.stage_s) and all(seconds == 0.0 for seconds in second.stage_s.values())
    assert second.table == first.table


def test_demo_cli_options_reach_the_recipe(capsys):
    from perta_stream.cli import build_parser, main
    from perta_stream.config.demo import DemoConfig
    from perta_stream.demo.recipe import DemoRecipe

    args = build_parser().parse_args(
        ["demo", "--split", "forget10", "--alphas", "1,2", "--max-items", "5", "--retain-count", "50", "--threads", "2", "--cache-dir", "somewhere"]
    )
    config = DemoConfig.from_cli(args)
    assert (config.recipe.split, config.recipe.alphas, config.recipe.eval_max_items, config.recipe.retain_count) == ("forget10", (1.0, 2.0), 5, 50)
    assert (config.threads, config.cache_dir, config.device) == (2, "somewhere", "cpu")
    assert config.recipe.shape == DemoRecipe().shape
    assert main(["demo", "--retain-count", "0", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--retain-count must be at least 1" in err and "--threads must be at least 1" in err
