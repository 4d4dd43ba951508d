"""LoRA: low-rank adapters for finetuning (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

Each targeted nn.Linear keeps its pretrained weight W (out, in), frozen, and gains two small
matrices, A (r, in) and B (out, r), trained in its place:

    y = x W^T + b + (dropout(x) A^T B^T) * alpha / r

B starts at zero, so the adapted model starts as the pretrained one. Only A and B train
(apply() freezes everything else), so the optimizer holds state for a few hundred thousand
numbers instead of the whole model. The defaults follow litgpt's finetune/lora.py (r 8,
alpha 16, dropout 0.05); the targets are GPT-2's c_attn and c_proj (the attention's
query/key/value and output projections and the MLP's output projection), the modules peft
users name for GPT-2.

A LoRA model's state_dict holds W, b, and next to them "<module>.lora_A" and "lora_B"; the
checkpoint keeps them apart, so a resumed run continues exactly. Everything that reads a
checkpoint for inference sees merged weights: merge_state_dict() folds W + alpha / r * B A
into plain GPT-2 keys, and the model that comes out is an ordinary GPT.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

TARGETS = ("c_attn", "c_proj", "c_fc")  # the Linear layers of a block, by their GPT-2 names


@dataclass
class LoRAConfig:
    rank: int = 8  # r: the adapters' inner size
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # dropout on the adapters' input during training
    targets: str = "c_attn,c_proj"  # comma-separated Linear names in the blocks: c_attn, c_proj, c_fc

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def target_names(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def problems(self) -> list[str]:
        p = []
        if self.rank < 1:
            p.append(f"--lora_rank must be at least 1 (0 = no LoRA), got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            p.append(f"--lora_alpha must be a finite number above 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            p.append(f"--lora_dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.target_names() if t not in TARGETS]
        if unknown or not self.target_names():
            p.append(f"--lora_targets must be a comma-separated list of {', '.join(TARGETS)}, "
                     f"got {self.targets!r}")
        return p

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; weight and bias keep their names (and are frozen)."""

    def __init__(self, linear: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # A as nn.Linear's default init (kaiming uniform, a=sqrt(5)) and B zero, as the paper and peft
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = cfg.scale
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + update * self.scale


def apply(model: nn.Module, cfg: LoRAConfig) -> int:
    """Swap the targeted Linear layers of model.transformer.h for LoRALinear and freeze every
    other parameter. Returns the number of trainable parameters."""
    names = set(cfg.target_names())
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if name in names and type(child) is nn.Linear:
                    setattr(parent, name, LoRALinear(child, cfg))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_state_dict(state: dict, lora: dict | None) -> dict:
    """A LoRA model's state_dict with each adapter folded into its weight (W + alpha/r * B A,
    in float32, then the weight's dtype): the plain GPT keys. Without lora, state as it is."""
    if not lora:
        return state
    scale = LoRAConfig(**lora).scale
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[:-len(".lora_A")]
            w = state[prefix + ".weight"]
            delta = state[prefix + ".lora_B"].float() @ state[key].float()  # (out, in)
            merged[prefix + ".weight"] = (w.float() + scale * delta).to(w.dtype)
    return merged


SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # train.py's flags, fixed on resume


def from_settings(cfg) -> LoRAConfig | None:
    """The LoRAConfig of train.py's settings (lora_rank, ...), or None when lora_rank is 0."""
    if cfg.lora_rank == 0:
        return None
    return LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
