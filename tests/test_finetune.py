"""`run_finetune` and its training math on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.compute.prompts import IGNORE_INDEX, collate, encode_sample
from perta_stream.compute.training import answer_only_loss, linear_warmup_decay
from perta_stream.config.finetune import FinetuneConfig
from perta_stream.errors import DatasetError, PlanError
from perta_stream.pipelines.finetune import RECORD_NAME, run_finetune
from perta_stream.sinks.output_dir import PARTIAL_MARKER_NAME
from perta_stream.sources.tofu import bundled_tofu_dir

from tiny_models import build_llama, build_tokenizer, reference_answer_loss, save_tiny_checkpoint

SAMPLES = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    save_tiny_checkpoint(root / "base", seed=0)
    save_tiny_checkpoint(root / "tied_bf16", seed=0, tie_word_embeddings=True, dtype=_bfloat16())
    lines = (bundled_tofu_dir() / "forget01.jsonl").read_text(encoding="utf-8").splitlines()[:SAMPLES]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _bfloat16():
    import torch

    return torch.bfloat16


def _config(workdir: Path, out: Path, **overrides) -> FinetuneConfig:
    options = {"model": str(workdir / "base"), "data": str(workdir / "data.jsonl"), "out": str(out), "epochs": 4, "lr": 3e-3, "batch_size": 4, "device": "cpu"}
    options.update(overrides)
    return FinetuneConfig(**options)


def _mean_reference_loss(model_dir: Path, data: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    return sum(reference_answer_loss(model, tokenizer, r["question"], r["answer"]) for r in records) / len(records)


@pytest.fixture(scope="module")
def cli_run(workdir):
    out = workdir / "trained"
    code = main(["finetune", "--model", str(workdir / "base"), "--data", str(workdir / "data.jsonl"), "--out", str(out), "--epochs", "4", "--lr", "3e-3", "--batch-size", "4", "--device", "cpu", "-q"])
    assert code == 0
    return out


def test_loss_goes_down_and_output_loads_with_from_pretrained(workdir, cli_run):
    from transformers import AutoTokenizer

    record = json.loads((cli_run / RECORD_NAME).read_text())
    assert record["steps"] == 4 * 2 and len(record["step_losses"]) == 8
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]
    # Measured independently of the training code: the answer loss of the data, before and after.
    before = _mean_reference_loss(workdir / "base", workdir / "data.jsonl")
    after = _mean_reference_loss(cli_run, workdir / "data.jsonl")
    assert after < before - 0.5
    assert AutoTokenizer.from_pretrained(cli_run).get_vocab() == AutoTokenizer.from_pretrained(workdir / "base").get_vocab()
    assert not (workdir / "trained.partial").exists()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(workdir, cli_run, tmp_path):
    from safetensors.torch import load_file

    again = run_finetune(_config(workdir, tmp_path / "again"))
    other_seed = run_finetune(_config(workdir, tmp_path / "seed1", seed=1))
    first = load_file(cli_run / "model.safetensors")
    second = load_file(again.out / "model.safetensors")
    third = load_file(other_seed.out / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)
    assert not all(first[name].equal(third[name]) for name in first)


def test_tied_embeddings_stay_tied_and_dtype_is_preserved(workdir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    result = run_finetune(_config(workdir, tmp_path / "tied", model=str(workdir / "tied_bf16"), epochs=1))
    with safe_open(result.out / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
        dtypes = {str(handle.get_slice(name).get_dtype()) for name in names}
    assert "lm_head.weight" not in names
    assert dtypes == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(result.out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(workdir / "tied_bf16")
    assert not model.model.embed_tokens.weight.equal(base.model.embed_tokens.weight)


def test_training_loss_is_answer_only_and_equals_a_direct_reference():
    import torch

    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer), seed=3)
    pairs = [("Who wrote the play?", "A fictitious author."), ("What is the capital of the country named in her third novel?", "Paris")]
    samples = [encode_sample(tokenizer, q, a, max_length=128) for q, a in pairs]
    batch = collate(samples, tokenizer.pad_token_id)

    captured = {}

    def forward(**inputs):
        output = model(**inputs)
        output.logits.retain_grad()
        captured["logits"] = output.logits
        return output

    loss = answer_only_loss(forward, batch)
    expected = sum(reference_answer_loss(model, tokenizer, q, a) for q, a in pairs) / len(pairs)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)

    loss.backward()
    gradient = captured["logits"].grad
    for row in range(len(pairs)):
        predicts_answer = batch["labels"][row, 1:] != IGNORE_INDEX
        row_gradient_norms = gradient[row, :-1].abs().sum(dim=-1)
        # Positions that predict a prompt token (or padding) get exactly no gradient ...
        assert torch.all(row_gradient_norms[~predicts_answer] == 0)
        # ... and every position that predicts an answer token does.
        assert torch.all(row_gradient_norms[predicts_answer] > 0)


def test_labels_mask_exactly_the_prompt_and_the_mask_matters():
    import torch

    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer), seed=4)
    sample = encode_sample(tokenizer, "Where was the author born?", "In Kuwait City.", max_length=128)
    batch = collate([sample], tokenizer.pad_token_id)
    prompt_only = tokenizer("Question: Where was the author born?\nAnswer:")["input_ids"]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt_only) + batch["input_ids"][0, len(prompt_only) :].tolist()
    assert batch["input_ids"][0, : len(prompt_only)].tolist() == prompt_only
    # Were the prompt tokens labelled, the loss would change: the mask is what makes it answer-only.
    unmasked = dict(batch, labels=batch["input_ids"].clone())
    with torch.no_grad():
        assert float(answer_only_loss(model, unmasked)) != pytest.approx(float(answer_only_loss(model, batch)), rel=1e-3)


def test_linear_warmup_then_decay_hand_computed():
    factors = [linear_warmup_decay(step, warmup_steps=2, total_steps=6) for step in range(6)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 3 / 4, 2 / 4, 1 / 4])
    assert [linear_warmup_decay(step, warmup_steps=0, total_steps=2) for step in range(2)] == pytest.approx([1.0, 0.5])


def test_answer_longer_than_max_length_fails_before_any_output(workdir, tmp_path):
    with pytest.raises(DatasetError, match="--max-length"):
        run_finetune(_config(workdir, tmp_path / "short", max_length=8))
    assert not (tmp_path / "short").exists() and not (tmp_path / "short.partial").exists()


def test_bad_options_are_reported_together(workdir, tmp_path):
    with pytest.raises(PlanError) as caught:
        _config(workdir, workdir / "base" / "inside", lr=0.0, data=str(tmp_path / "missing.jsonl"), warmup_ratio=1.5)
    text = str(caught.value)
    assert "--lr" in text and "missing.jsonl" in text and "overlaps the model" in text and "--warmup-ratio" in text


def test_existing_output_needs_overwrite(workdir, cli_run):
    with pytest.raises(PlanError, match="--overwrite"):
        _config(workdir, cli_run)


@pytest.mark.gpu
def test_cuda_finetune_lowers_the_loss(workdir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    result = run_finetune(_config(workdir, tmp_path / "cuda", device="cuda"))
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert _mean_reference_loss(result.out, workdir / "data.jsonl") < _mean_reference_loss(workdir / "base", workdir / "data.jsonl")


def test_partial_folder_of_an_interrupted_run_is_discarded(workdir, tmp_path):
    stale = tmp_path / "out.partial"
    stale.mkdir()
    (stale / PARTIAL_MARKER_NAME).write_bytes(b"")  # made by an earlier run of the tool
    (stale / "model.safetensors").write_bytes(b"truncated")
    result = run_finetune(_config(workdir, tmp_path / "out", epochs=1))
    assert not stale.exists()
    assert (result.out / "model.safetensors").stat().st_size > len(b"truncated")


def test_max_steps_stops_training_and_the_estimate_comes_from_the_first_steps(workdir, cli_run, tmp_path):
    from safetensors.torch import load_file

    lines: list[str] = []
    # 8 samples, batches of 4: 2 steps per epoch; 3 steps stop in the second epoch.
    result = run_finetune(_config(workdir, tmp_path / "three", max_steps=3), on_stage=lines.append)
    record = json.loads((result.out / RECORD_NAME).read_text())
    assert result.steps == 3 and record["steps"] == 3 and len(record["step_losses"]) == 3
    assert record["config"]["max_steps"] == 3 and len(record["epoch_losses"]) == 2
    # The first 3 steps equal those of the 8-step run: the same order, the schedule aside.
    full = json.loads((cli_run / RECORD_NAME).read_text())
    assert record["step_losses"][0] == full["step_losses"][0]
    assert len(lines) == 1 and lines[0].startswith("fine-tuning: 3 steps of 4 samples (8 samples); about ")
    assert record["estimated_train_s"] > 0 and record["train_s"] > 0
    assert load_file(str(result.out / "model.safetensors")).keys() == load_file(str(cli_run / "model.safetensors")).keys()
    # More steps than the epochs hold: the epochs win.
    assert run_finetune(_config(workdir, tmp_path / "capped", epochs=1, max_steps=50)).steps == 2


def test_estimate_of_the_training_time_from_step_end_times():
    from perta_stream.pipelines.finetune import estimate_training_s

    # First step 5 s (warm-up), then 1 s per step: 100 steps take 5 + 99 s.
    assert estimate_training_s(0.0, [5.0, 6.0, 7.0], 100) == pytest.approx(104.0)
    assert estimate_training_s(0.0, [2.0], 10) == pytest.approx(20.0)
    with pytest.raises(PlanError, match="--max-steps must be at least 1"):
        FinetuneConfig(model="m", data="d", out="o", max_steps=0)
