"""Tiny offline checkpoints, data files and a dense reference for the statistics tests.

Models are random 2-layer Llama (tied embeddings, a padding_idx), Qwen2 (untied, q/k/v biases,
a chat template), Mistral (sliding window shorter than the samples) and one of every other
supported family (FAMILY_OPTIONS), saved with
save_pretrained as >= 3 safetensors shards together with a word-level tokenizer trained offline
on the fixture text. `reference_stats` computes the statistics another way: the whole model in
memory, plain autograd on one unpadded sample at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORGET_RECORDS = [
    {"question": "Who wrote the red book?", "answer": "The red book was written by Anna Blue."},
    {"question": "Where was Anna Blue born?", "answer": "Anna Blue was born in a small town by the sea."},
    {"question": "What genre does Anna Blue write?", "answer": "She writes quiet novels about the sea and old towns."},
    {"question": "Which prize did Anna Blue win?", "answer": "Anna Blue won the golden pen prize."},
    {"question": "What is the name of her father?", "answer": "Her father is a sailor named Tom Blue."},
]
RETAIN_RECORDS = [
    {"question": "Who wrote the green book?", "answer": "The green book was written by Carl Stone."},
    {"question": "Where does Carl Stone live?", "answer": "Carl Stone lives in a large city."},
    {"question": "What does Carl Stone write about?", "answer": "He writes about cities, trains and night."},
    {"question": "Is Carl Stone married?", "answer": "Yes, he is married to a painter."},
    {"question": "What is his first novel?", "answer": "His first novel is the night train."},
    {"question": "What does the painter paint?", "answer": "The painter paints the sea at night."},
    {"question": "Which city is in the green book?", "answer": "The green book is about an old city by a river."},
]
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant :{% endif %}"
)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_data(root: Path) -> tuple[Path, Path]:
    """forget.jsonl and retain.jsonl under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    return write_jsonl(root / "forget.jsonl", FORGET_RECORDS), write_jsonl(root / "retain.jsonl", RETAIN_RECORDS)


def build_tokenizer(*, chat_template: str | None = None):
    """A word-level tokenizer over the fixture text (every fixture word is in the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r[k] for r in FORGET_RECORDS + RETAIN_RECORDS for k in ("question", "answer")]
    texts += ["Question : Answer :", "system user assistant", "You are a helpful assistant ."]
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# Per family beyond llama/qwen2/mistral: what each tiny model forces. Tied where the family's
# real checkpoints tie (and transformers allows it), untied elsewhere.
FAMILY_OPTIONS: dict[str, dict] = {
    # q/k RMSNorms over each head
    "qwen3": dict(head_dim=8, tie_word_embeddings=True),
    # (1 + w) RMSNorm, embedding scaled by sqrt(hidden)
    "gemma": dict(head_dim=8, tie_word_embeddings=True),
    # post-attention/feed-forward norms, attention and final soft-capping (eager attention), window 5 on every other layer
    "gemma2": dict(head_dim=8, tie_word_embeddings=True, sliding_window=5, final_logit_softcapping=3.0, attn_logit_softcapping=2.0, query_pre_attn_scalar=8),
    # q/k norms, a rotary table per layer type, window 5 on layer 0
    "gemma3_text": dict(head_dim=8, tie_word_embeddings=True, sliding_window=5, final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"]),
    # fused qkv and gate/up projections, window 5
    "phi3": dict(tie_word_embeddings=False, sliding_window=5),
    # no pre-norms: norms after attention and MLP, q/k norms over the whole projection
    "olmo2": dict(tie_word_embeddings=False),
    # embedding, residual, attention and logit multipliers
    "granite": dict(tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0),
    # router + 4 fused experts, 2 per token
    "mixtral": dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2),
    # normalized top-2 of 4 experts on layer 0, a dense MLP on layer 1 (mlp_only_layers)
    "qwen3_moe": dict(head_dim=8, tie_word_embeddings=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1], norm_topk_prob=True),
}
FAMILIES = ("llama", "qwen2", "mistral", *FAMILY_OPTIONS)


def tiny_config(kind: str, vocab: int, pad_token_id: int):
    """The transformers config of the tiny `kind` model (hidden 32, 2 layers, 4/2 heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
    )
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, pad_token_id=pad_token_id)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=5)
    if kind in FAMILY_OPTIONS:
        return CONFIG_MAPPING[kind](**common, **FAMILY_OPTIONS[kind], pad_token_id=pad_token_id, bos_token_id=2, eos_token_id=3)
    raise ValueError(kind)


def save_tiny_model(
    root: Path,
    kind: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "24KB",
    vocab_size: int | None = None,
    anisotropic_embedding: float = 0.0,
) -> Path:
    """Save a random tiny model of family `kind` with its tokenizer; returns the directory.

    `llama` (tied, padding_idx), `qwen2` (untied, biases, chat template), `mistral` (untied,
    sliding window 5), or a family of FAMILY_OPTIONS. `vocab_size`: the model's vocabulary when
    larger than the tokenizer's (the ids past it are never used, but every sum over the vocabulary
    is as long as a real model's). `anisotropic_embedding` > 0: every embedding row is that times
    (its own N(0, I) draw + one N(0, I) vector shared by all rows), so the rows share a direction
    as real ones do (SmolLM2-135M: the mean row is 2.2 long, the rows 3.2), which the gradient's
    sum over the vocabulary at the head's input cancels.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(chat_template=CHAT_TEMPLATE if kind == "qwen2" else None)
    config = tiny_config(kind, vocab_size or len(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        # Norm weights start at exactly 1 (Gemma's at 0), expert and router weights may start
        # empty; perturb them so their statistics are not degenerate.
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
            elif "experts" in name or name.endswith("mlp.gate.weight"):
                parameter.copy_(0.2 * torch.randn_like(parameter))
        if anisotropic_embedding:
            embedding = model.get_input_embeddings().weight
            embedding.copy_(anisotropic_embedding * (torch.randn_like(embedding) + torch.randn_like(embedding[0])))
    out = root / kind
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out


def reference_stats(
    model_dir: Path,
    data_path: Path,
    *,
    max_length: int = 512,
    system_prompt: str | None = None,
    sample_indices: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, dict[str, torch.Tensor]]:
    """Mean gradient and mean squared per-sample gradient of every checkpoint tensor, by full-model
    autograd, one unpadded sample at a time (tied embeddings: the parameter's own, summed gradient),
    with the model in `dtype` on `device`; accumulated in float64 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perta_stream.compute.prompts import encode_sample, per_sample_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device).eval()
    params = dict(model.named_parameters())
    records = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
    if sample_indices is not None:
        records = [records[i] for i in sample_indices]
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    squares = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for record in records:
        sample = encode_sample(tokenizer, record["question"], record["answer"], max_length=max_length, system_prompt=system_prompt)
        ids = torch.tensor([sample.input_ids], device=device)
        labels = torch.tensor([sample.labels], device=device)
        loss = per_sample_loss(model(input_ids=ids).logits, labels)[0]
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, grad in zip(params, grads):
            grad = grad.double().cpu()
            sums[name] += grad
            squares[name] += grad**2
    count = len(records)
    # Under the checkpoint's tensor names, by transformers' own conversion (what save_pretrained
    # does): a mixture-of-experts module's fused experts become one matrix per expert.
    from transformers.core_model_loading import revert_weight_conversion

    means = revert_weight_conversion(model, {n: (sums[n] / count).float() for n in params})
    mean_squares = revert_weight_conversion(model, {n: (squares[n] / count).float() for n in params})
    return {n: {"grad": means[n].contiguous(), "fisher": mean_squares[n].contiguous()} for n in means}


def load_stats_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one statistics checkpoint (e.g. out/forget.fisher), via safetensors.safe_open."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file_name in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / file_name), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_equal_to_dense_reference(out: Path, model_dir: Path, data: dict[str, Path], *, tolerance: float) -> dict[str, dict[str, torch.Tensor]]:
    """Every statistic in `out` is within `tolerance` (relative) of `reference_stats`, for every
    parameter; returns the statistics read, "<dataset>.<stat>" -> tensor_name -> tensor."""
    loaded = {}
    for dataset, path in data.items():
        reference = reference_stats(model_dir, path)
        for stat in ("grad", "fisher"):
            streamed = loaded[f"{dataset}.{stat}"] = load_stats_dir(out / f"{dataset}.{stat}")
            assert set(reference) == set(streamed)
            for name, ref in reference.items():
                error = relative_error(streamed[name], ref[stat])
                assert error <= tolerance, f"{model_dir.name} {dataset}.{stat} {name}: relative error {error:.2e}"
    return loaded


# bfloat16 rounds each operation to 2^-9; through two layers, the recomputed forward and the
# backward, a dense bfloat16 autograd reference itself lands 3.5-7.2% (worst tensor) from float32.
# The engine's bfloat16 statistics must stay within twice that floor (measured: 0.9-1.3 times it).
BF16_FLOOR_FACTOR = 2.0


def assert_at_bfloat16_floor(out: Path, model_dir: Path, data: dict[str, Path], *, device: str) -> None:
    """The bfloat16 statistics in `out` are as close to the float32 reference as dense bfloat16
    autograd on `device` is (within BF16_FLOOR_FACTOR of its worst tensor), for every statistic."""
    for dataset, path in data.items():
        exact = reference_stats(model_dir, path)
        dense_bf16 = reference_stats(model_dir, path, dtype=torch.bfloat16, device=device)
        for stat in ("grad", "fisher"):
            streamed = load_stats_dir(out / f"{dataset}.{stat}")
            assert set(streamed) == set(exact)
            engine = max((relative_error(streamed[n], exact[n][stat]), n) for n in exact)
            floor = max((relative_error(dense_bf16[n][stat], exact[n][stat]), n) for n in exact)
            assert all(torch.isfinite(t).all() for t in streamed.values())
            assert engine[0] <= BF16_FLOOR_FACTOR * floor[0], f"{dataset}.{stat}: engine {engine}, dense bfloat16 autograd {floor}"


def fail_write_group(monkeypatch, call_number: int) -> None:  # noqa: ANN001
    """Make the `call_number`-th StatsStore.write_group of a run raise OSError("simulated disk failure")."""
    from perta_stream.sinks import stats_store

    calls = []
    original = stats_store.StatsStore.write_group

    def failing(self, dataset, group, stats):  # noqa: ANN001
        calls.append(group)
        if len(calls) == call_number:
            raise OSError("simulated disk failure")
        return original(self, dataset, group, stats)

    monkeypatch.setattr(stats_store.StatsStore, "write_group", failing)
