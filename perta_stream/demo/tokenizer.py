"""The demo's tokenizer: a small byte-level BPE trained offline on the bundled TOFU text.

Nothing is downloaded: the vocabulary is learned from the strings the demo will train and evaluate
on, so every character of the evaluation text has tokens. The result is a standard
`PreTrainedTokenizerFast` (saved as `tokenizer.json` + `tokenizer_config.json`) that
`AutoTokenizer.from_pretrained` loads back, with an EOS token (also used as BOS-free end of an
answer) and a separate pad token. It has no chat template, so prompts are rendered as
`Question: {q}\\nAnswer: {a}<eos>` by `perta_stream.compute.prompts`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from perta_stream.errors import UsageError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
MIN_VOCAB_SIZE = 300  # 256 byte symbols + the special tokens + a few merges


def train_demo_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    Training is deterministic for the same texts in the same order, so the cached demo models
    always see the same token ids.

    Args:
        texts: the training strings (questions and answers).
        vocab_size: the target vocabulary size, special tokens included.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with `eos_token`, `pad_token` and `unk_token` set.

    Raises:
        UsageError: vocab_size below MIN_VOCAB_SIZE or no text to train on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(f"the demo tokenizer needs vocab_size >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}")
    corpus = [text for text in texts if text]
    if not corpus:
        raise UsageError("no text to train the demo tokenizer on; the bundled TOFU files are empty or missing")

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # Byte-level pre-tokenization: any UTF-8 string is encodable, and " word" keeps its leading
    # space, which the plain prompt format relies on (` {answer}` is tokenized separately).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
