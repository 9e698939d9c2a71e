"""The demo's recipe: every number that decides what the demo builds, and the cache keys derived from it.

The recipe is split into stages (models, statistics, sweep); each stage's key hashes its own
options, the keys of the stages it builds on, the bundled data and the tool version, so changing
the α grid re-runs only the sweep, and changing the model size rebuilds everything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from perta_stream import __version__
from perta_stream.demo.model import DemoModelShape

DEMO_METHODS = ("tv", "uniform", "grad", "fisher")
DEMO_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo builds and runs.

    Attributes:
        split: the TOFU forget split (forget01 or forget10, both bundled).
        retain_count: how many retain90 records θ_full and θ_ret are trained on.
        vocab_size: the BPE tokenizer's vocabulary.
        shape: the Llama model's dimensions.
        model_seed: the random initialisation of θ_0.
        pretrain_epochs, pretrain_lr: θ_0's training on real-author and world-fact QA.
        finetune_epochs, finetune_lr: θ_full, θ_fgt and θ_ret's fine-tuning from θ_0.
        lora_rank: θ_fgt as a rank-`lora_rank` LoRA adapter (`finetune --lora`, alpha 2·rank, same
            epochs and learning rate) in `fgt-lora<rank>/` of the models' folder, which the sweep
            reads as its θ_fgt; None: θ_fgt fully fine-tuned (`fgt/`). The other models and the
            statistics do not depend on it, so they are shared.
        batch_size: samples per optimizer step (all training runs).
        train_seed: data order of all training runs.
        max_length: tokens per sample everywhere.
        stats_fraction: share of forget and retain samples the statistics use.
        methods, alphas: the sweep grid.
        eval_max_items: items of each evaluation set scored (None: all).
        max_new_tokens: greedy generation length for ROUGE-L.
        eval_batch_size: samples per evaluation forward pass.
    """

    split: str = "forget01"
    retain_count: int = 200
    vocab_size: int = 2048
    shape: DemoModelShape = field(default_factory=DemoModelShape)
    model_seed: int = 0
    pretrain_epochs: int = 40
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 20
    finetune_lr: float = 1e-3
    lora_rank: int | None = None
    batch_size: int = 8
    train_seed: int = 0
    max_length: int = 256
    stats_fraction: float = 1.0
    methods: tuple[str, ...] = DEMO_METHODS
    alphas: tuple[float, ...] = DEMO_ALPHAS
    eval_max_items: int | None = 40
    max_new_tokens: int = 48
    eval_batch_size: int = 16

    def models_key(self, data_digest: str) -> str:
        """Key of the tokenizer, data files and the four models."""
        options = {
            name: value
            for name, value in asdict(self).items()
            if name in {"split", "retain_count", "vocab_size", "shape", "model_seed", "pretrain_epochs", "pretrain_lr",
                        "finetune_epochs", "finetune_lr", "batch_size", "train_seed", "max_length"}
        }
        return _digest({"stage": "models", "tool": __version__, "data": data_digest, **options})

    def stats_key(self, models_key: str) -> str:
        """Key of the statistics (computed at θ_0 on the forget and retain files)."""
        return _digest({"stage": "stats", "models": models_key, "fraction": self.stats_fraction, "tool": __version__})

    @property
    def fgt_name(self) -> str:
        """θ_fgt's folder in the models' folder."""
        return "fgt" if self.lora_rank is None else f"fgt-lora{self.lora_rank}"

    def sweep_key(self, stats_key: str) -> str:
        """Key of the sweep (merges, evaluations, table and plot); a LoRA θ_fgt's rank is part of
        it (a full θ_fgt's key is what it was before the option existed)."""
        options = {name: asdict(self)[name] for name in ("methods", "alphas", "eval_max_items", "max_new_tokens", "eval_batch_size")}
        if self.lora_rank is not None:
            options["lora_rank"] = self.lora_rank
        return _digest({"stage": "sweep", "stats": stats_key, "tool": __version__, **options})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"], data["alphas"] = list(self.methods), list(self.alphas)
        return data


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]
