"""Tiny offline models and tokenizers for the eval and finetune tests (nothing is downloaded).

The tokenizer is a byte-level BPE trained in a fraction of a second on the bundled TOFU text, so
every string encodes; the model is a random 2-layer Llama whose vocabulary matches it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from perta_stream.sources.tofu import bundled_tofu_dir

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def training_text(limit: int = 300) -> list[str]:
    """Questions and answers of the bundled retain file, the tokenizer's training text."""
    lines = []
    with open(bundled_tofu_dir() / "retain90.jsonl", encoding="utf-8") as handle:
        for line, _ in zip(handle, range(limit)):
            record = json.loads(line)
            lines += [record["question"], record["answer"]]
    return lines


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    # Training takes a moment; tests build several checkpoints, so the result is reused.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(training_text(), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    return core.to_str()


def build_tokenizer(vocab_size: int = 384, *, chat_template: str | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with <pad>, <s> (BOS, prepended) and </s> (EOS)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def reference_answer_loss(model, tokenizer, question: str, answer: str) -> float:
    """Mean NLL of the answer tokens (+EOS) of the plain prompt, one unpadded sequence, from log_softmax.

    Written independently of compute/prompts.py so tests compare two implementations.
    """
    import torch

    prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    token_log_probs = [log_probs[len(prompt) - 1 + k, token] for k, token in enumerate(answer_ids)]
    return -float(sum(token_log_probs)) / len(answer_ids)


def build_llama(vocab_size: int, *, seed: int = 0, tie_word_embeddings: bool = False, hidden_size: int = 32, num_layers: int = 2):
    """A random Llama with a small width, float32, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A larger init than the default 0.02 makes the random model's answers differ clearly in
    # likelihood, so comparisons in the tests are not all between near-uniform distributions.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.3)
    return model.eval()


def save_tiny_checkpoint(directory: Path, *, seed: int = 0, tie_word_embeddings: bool = False, dtype=None, vocab_size: int | None = None) -> Path:
    """Write a tiny Llama + its tokenizer as a normal checkpoint directory and return it.

    Args:
        vocab_size: the model's vocabulary (default: the tokenizer's); smaller makes a mismatch.
        dtype: cast the weights before saving (e.g. torch.bfloat16).
    """
    tokenizer = build_tokenizer()
    model = build_llama(vocab_size or len(tokenizer), seed=seed, tie_word_embeddings=tie_word_embeddings)
    if dtype is not None:
        model = model.to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tofu_subset(directory: Path, *, items: int, forget_split: str = "forget01") -> Path:
    """A small TOFU directory: the first `items` records of each evaluation file of the bundled copy."""
    source = bundled_tofu_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for name in (f"{forget_split}_perturbed.jsonl", "retain_perturbed.jsonl", "real_authors_perturbed.jsonl", "world_facts_perturbed.jsonl"):
        lines = (source / name).read_text(encoding="utf-8").splitlines()[:items]
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory
