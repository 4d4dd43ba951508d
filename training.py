"""What a training run is, apart from its loop: its settings, the learning-rate schedule and one
optimizer step. train.py runs them; bench.py times the same step on the same settings.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import hardware
import hf_format
import lora
from model import ModelOptions


@dataclass
class TrainConfig(ModelOptions):
    """Settings of train.py. Names and meanings follow nanoGPT's train.py; the model's options
    (n_layer, n_head, n_embd, block_size, dropout, bias, activation, ...) come from
    model.ModelOptions and are listed last."""
    # I/O
    out_dir: str = "out"  # folder for ckpt.pt and metrics.jsonl
    eval_interval: int = 2000  # evaluate train/val loss (and checkpoint) every this many iterations
    log_interval: int = 1  # log the training loss every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation
    eval_only: bool = False  # evaluate once and exit
    eval_at_start: bool = True  # evaluate before the first step too (nanoGPT does; short timed runs skip it)
    eval_train: bool = True  # evaluate the train split too (nanoGPT does); false halves an evaluation's time
    always_save_checkpoint: bool = True  # checkpoint at every evaluation, not only when val improves (with patience: only the best)
    patience: int = 0  # stop after this many evaluations in a row without a better val loss; ckpt.pt keeps the best. 0 = off
    init_from: str = "scratch"  # scratch (a new model), resume (from out_dir/ckpt.pt), a GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face GPT-2 folder, or a folder holding a ckpt.pt to finetune
    # logging
    wandb_log: bool = False  # log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "nanogpt"  # wandb project name
    wandb_run_name: str = "run"  # wandb run name
    # data
    dataset: str = "shakespeare_char"  # folder under data_dir made by prepare.py
    data_dir: str = "data"  # where prepared datasets live
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step (global, split across ranks)
    batch_size: int = 12  # sequences per micro-step
    # model: ModelOptions' fields, with nanoGPT's training default for one of them
    bias: bool = False  # biases in Linear layers and LayerNorms (GPT-2 has them; without trains a bit better and faster)
    # optimizer
    optimizer: str = "adamw"  # adamw, or muon (Muon for the matrices in the blocks, AdamW for the rest)
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # optimizer steps in the whole run (an upper bound with time_budget)
    time_budget: float = 0.0  # seconds of training (start-up, compilation, evaluation left out) the run lasts; the schedule follows the time spent. 0 = off
    weight_decay: float = 1e-1  # decoupled weight decay of AdamW and Muon (2-D weights only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip gradients to this global norm; 0 disables
    head_lr_scale: float = 1.0  # learning rate of an untied head (--tie_head=false), times learning_rate
    embed_lr_scale: float = 1.0  # learning rate of the embedding tables (wte, wpe, bigram, value), times learning_rate
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to 0.95 (modded-nanogpt); 0: 0.95 throughout
    # learning rate schedule
    decay_lr: bool = True  # warm up linearly then decay (lr_schedule); false keeps learning_rate
    lr_schedule: str = "cosine"  # after warmup: cosine (nanoGPT) or wsd (constant, then linear), to min_lr at lr_decay_iters
    warmdown_frac: float = 0.5  # wsd: the last fraction of lr_decay_iters, where the rate falls linearly to min_lr
    warmup_iters: int = 2000  # linear warmup steps
    lr_decay_iters: int = 600000  # step where the cosine reaches min_lr (~max_iters per Chinchilla)
    min_lr: float = 6e-5  # floor of the schedule (~learning_rate / 10 per Chinchilla)
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16 (autocast dtype)
    compile: bool = False  # torch.compile the model (a gain on GPUs; on a CPU, bench.py --compile tells)
    seed: int = 1337  # seed for weights, dropout and batch sampling
    deterministic: bool = False  # GPU: deterministic kernels, so a run and its resume are bit-reproducible; slower (an eager CPU run is already; a compiled one with OMP_NUM_THREADS=1)
    backend: str = "nccl"  # torch.distributed backend under torchrun on GPUs (gloo on CPUs)
    # finetuning (docs/finetune.md)
    lora_rank: int = 0  # LoRA: train rank-r adapters on the targeted layers, everything else frozen; 0 = off
    lora_alpha: float = 16.0  # LoRA: the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # LoRA: dropout on the adapters' input during training
    lora_targets: str = "c_attn,c_proj"  # LoRA: comma-separated Linear layers of each block (c_attn, c_proj, c_fc)
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass: less memory, more compute

    def problems(self) -> list[str]:
        """Every setting that cannot work, so all are reported at once before any work."""
        positive = ["eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size"]
        p = [f"--{k} must be at least 1, got {getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        p += super().problems()  # the model's options
        for k in ["learning_rate", "weight_decay", "grad_clip", "min_lr"]:
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                p.append(f"--{k} must be a finite number >= 0, got {v}")
        if self.learning_rate == 0:
            p.append("--learning_rate must be above 0")
        for k in ["beta1", "beta2"]:
            if not 0 <= getattr(self, k) < 1:
                p.append(f"--{k} must be in [0, 1), got {getattr(self, k)}")
        if self.max_iters < 0:
            p.append(f"--max_iters must be >= 0, got {self.max_iters}")
        if self.decay_lr:
            if self.warmup_iters < 0:
                p.append(f"--warmup_iters must be >= 0, got {self.warmup_iters}")
            if self.lr_decay_iters < self.warmup_iters:
                p.append(f"--lr_decay_iters ({self.lr_decay_iters}) is shorter than --warmup_iters "
                         f"({self.warmup_iters}); set it to about --max_iters")
            if self.min_lr > self.learning_rate > 0:  # (a learning rate <= 0 has its own line)
                p.append(f"--min_lr ({self.min_lr}) is above --learning_rate ({self.learning_rate})")
        if self.optimizer not in ("adamw", "muon"):
            p.append(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "wsd"):
            p.append(f"--lr_schedule must be cosine or wsd, got {self.lr_schedule!r}")
        if not 0 <= self.warmdown_frac <= 1:
            p.append(f"--warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        for k in ("head_lr_scale", "embed_lr_scale"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0):
                p.append(f"--{k} must be a finite number above 0, got {getattr(self, k)}")
        if not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            p.append(f"--time_budget must be a number of seconds >= 0 (0 = off), got {self.time_budget}")
        if self.patience < 0:
            p.append(f"--patience must be >= 0 (0 = off), got {self.patience}")
        if bad_seed := hardware.seed_problem(self.seed):
            p.append(bad_seed)
        if not self.out_dir.strip():
            p.append("--out_dir is empty: give the folder the run writes to, e.g. --out_dir=out")
        if self.muon_momentum_warmup < 0:
            p.append(f"--muon_momentum_warmup must be >= 0, got {self.muon_momentum_warmup}")
        if self.lora_rank < 0:
            p.append(f"--lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        elif self.lora_rank:
            p += lora.from_settings(self).problems()
            if self.optimizer == "muon":  # Muon orthogonalizes whole matrices; the adapters are rank-r factors
                p.append("--lora_rank trains its adapters with AdamW: drop --optimizer=muon")
            if self.init_from == "scratch":
                p.append("--lora_rank adapts a trained model, not random weights: give --init_from=gpt2 (or "
                         "another GPT-2), a Hugging Face folder, a folder holding a ckpt.pt, or resume")
        if self.init_from not in ("scratch", "resume", *hf_format.GPT2_NAMES) and not Path(self.init_from).is_dir():
            p.append(f"--init_from must be scratch or resume, a GPT-2 ({', '.join(hf_format.GPT2_NAMES)}), a "
                     f"folder holding a ckpt.pt or a folder holding a Hugging Face GPT-2; got {self.init_from!r}, "
                     f"which is no folder")
        return p


# ---------------------------------------------------------------------------- schedule

def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr. With
    lr_schedule "wsd" (warmup-stable-decay, as modded-nanogpt and nanochat train): after the
    warmup the rate stays at learning_rate, then falls linearly to min_lr over the last
    warmdown_frac of lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:  # (where the decay would end anyway; also when it is the warmup's end)
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        warmdown = cfg.warmdown_frac * cfg.lr_decay_iters
        left = (cfg.lr_decay_iters - it) / warmdown if warmdown > 0 else 1.0  # 1 at the warmdown's start, 0 at the end
        return cfg.min_lr + min(1.0, left) * (cfg.learning_rate - cfg.min_lr)
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # from 1 down to 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def schedule_iter(iter_num: int, train_seconds: float, cfg: TrainConfig) -> float:
    """Where the run is on its schedule (get_lr, get_muon_momentum): the iteration, or with
    time_budget the share of the budget spent times lr_decay_iters, so that warmup, decay and
    Muon's momentum warmup are the same fractions of the budget as of lr_decay_iters."""
    if not cfg.time_budget:
        return iter_num
    return train_seconds / cfg.time_budget * cfg.lr_decay_iters


class TimeBudget:
    """The training time of a run (saved in the checkpoint as train_seconds), which with
    --time_budget sets the schedule and the end. Only the training steps count: start-up,
    evaluations, checkpoints and, with --compile, this process's first step (where the
    compilation happens) do not. Under DDP rank 0's clock decides: its time is broadcast to
    every rank at each step, so all ranks use the same learning rate and stop together."""

    def __init__(self, cfg: TrainConfig, spent: float, precision, ddp: bool):
        self.seconds = cfg.time_budget  # 0: no budget, the time is only recorded
        self.spent = spent  # training seconds so far, of this run and the runs it resumes
        self.precision, self.ddp = precision, ddp
        self.skip_next = cfg.compile  # the compiling step is start-up, not training
        self.started = None

    def agree(self) -> float:
        """The training seconds spent: rank 0's on every rank (under DDP with a budget)."""
        if self.ddp and self.seconds:
            t = torch.tensor([self.spent], dtype=torch.float64, device=self.precision.device)
            torch.distributed.broadcast(t, src=0)
            self.spent = t.item()
        return self.spent

    @property
    def used_up(self) -> bool:
        return self.seconds > 0 and self.spent >= self.seconds

    def start(self):
        if self.seconds:  # the clock is read when the device is done (a GPU runs ahead)
            self.precision.synchronize()
        self.started = time.perf_counter()

    def stop(self):
        if self.seconds:
            self.precision.synchronize()
        if not self.skip_next:
            self.spent += time.perf_counter() - self.started
        self.skip_next = False


def get_muon_momentum(it: int, cfg: TrainConfig) -> float:
    """Muon's momentum: from 0.85 up to 0.95 over muon_momentum_warmup steps (modded-nanogpt),
    so the first updates follow the fresh gradients more closely."""
    if it >= cfg.muon_momentum_warmup:
        return 0.95
    return 0.85 + 0.10 * it / cfg.muon_momentum_warmup


def set_schedule(optimizer, it: int, cfg: TrainConfig) -> float:
    """Set each parameter group's learning rate for iteration it (get_lr, times the group's
    lr_scale) and, with Muon, its momentum; returns the learning rate."""
    lr = get_lr(it, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if cfg.optimizer == "muon":
        for group in optimizer.muon.param_groups:
            group["momentum"] = get_muon_momentum(it, cfg)
    return lr


# ---------------------------------------------------------------------------- one step

def train_step(model, optimizer, scaler, batches, precision, grad_clip: float, ddp: bool = False):
    """One optimizer step over the micro-batches [(x, y), ...] (gradient accumulation).

    Returns the last micro-batch's loss and the global gradient norm. A non-finite norm means
    the step was not taken: under float16 the GradScaler skips it and lowers its scale; in
    other dtypes it is skipped here, and train.py stops. bench.py times this same function.
    """
    accum = len(batches)
    for i, (x, y, *positions) in enumerate(batches):  # positions: (B, T) in document mode
        # under DDP, gradients are synchronised on the last micro-step only
        with model.no_sync() if ddp and i < accum - 1 else nullcontext():
            with precision.autocast():
                _, loss = model(x, y, positions=positions[0] if positions else None)
            scaler.scale(loss / accum).backward()  # gradients of all micro-steps add up
    scaler.unscale_(optimizer)  # clip (and check) the true gradients, not the scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if scaler.is_enabled() or torch.isfinite(grad_norm):
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm
