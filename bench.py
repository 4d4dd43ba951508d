"""Measure how fast this machine trains and samples a model shape: no dataset needed.

    python bench.py                                  # the shakespeare_char model (6x384, block 256)
    python bench.py configs/shakespeare.py --dtype=float32
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=12 --vocab_size=50304

Prints, as medians over `repeats` timed runs after a warm-up:
  - matmul peak: FLOP/s of a large square matrix product in the training dtype, measured here
    because datasheets do not cover every CPU; it is the denominator of MFU
  - train: tokens/s and MFU of the same step as train.py (autocast forward, backward, grad
    clip, fused AdamW) on random tokens of the config's vocabulary
  - sample: tokens/s of model.generate in sample.py's precision (float32 on CPUs), at batch 1
    with and without the KV cache, and in all for a batch of sample_batch sequences
Any train.py config file or flag works here; the few extra keys are listed by --help.
"""
import os
import statistics
import time
from dataclasses import dataclass

import torch

import hardware
from config import parse_config
from errors import run_main
from model import GPT, GPTConfig
from sample import choose_precision
from train import TrainConfig, train_step


@dataclass
class BenchConfig(TrainConfig):
    """Settings of bench.py: every train.py key (so its config files load) plus the ones below."""
    # the default model is the shakespeare_char one
    batch_size: int = 64  # sequences per micro-step
    block_size: int = 256  # context length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # embedding width
    dropout: float = 0.2  # dropout probability
    vocab_size: int = 65  # vocabulary of the random tokens (65 = shakespeare_char)
    warmup: int = 2  # untimed runs of each measurement before timing
    repeats: int = 5  # timed runs of each measurement; the table reports the median
    train_steps: int = 3  # optimizer steps per timed training run
    sample_tokens: int = 100  # new tokens per timed sampling run
    sample_batch: int = 10  # sequences of the batched sampling row (sample.py --num_samples)
    peak_size: int = 4096  # side of the square matrices of the peak FLOP/s measurement
    skip_sample: bool = False  # measure training only

    def problems(self) -> list[str]:
        p = super().problems()
        for k in ["vocab_size", "repeats", "train_steps", "sample_tokens", "sample_batch", "peak_size"]:
            if getattr(self, k) < 1:
                p.append(f"--{k} must be at least 1, got {getattr(self, k)}")
        if self.warmup < 0:
            p.append(f"--warmup must be >= 0, got {self.warmup}")
        return p


def timed(fn, precision, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed ones; the device is
    synchronized before every clock reading."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        precision.synchronize()
        t0 = time.perf_counter()
        fn()
        precision.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(cfg: BenchConfig, precision) -> list[float]:
    """FLOP/s of (n, n) @ (n, n) in the autocast dtype, one sample per repeat."""
    n = cfg.peak_size
    a = torch.randn(n, n, device=precision.device, dtype=precision.torch_dtype)
    b = torch.randn(n, n, device=precision.device, dtype=precision.torch_dtype)
    times = timed(lambda: a @ b, precision, max(cfg.warmup, 1), cfg.repeats)
    return [2 * n**3 / t for t in times]


def flops_per_token(model: GPT, cfg: BenchConfig) -> int:
    """Training FLOPs per token: 6N for the weights' forward and backward, plus attention's
    12 * n_layer * n_embd * block_size (PaLM appendix B, as in nanoGPT's estimate_mfu)."""
    return 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def bench_train(model, cfg: BenchConfig, precision) -> list[float]:
    """Training tokens/s, one sample per repeat, of train.py's train_step on random tokens."""
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                          precision.device_type, cfg.optimizer)
    scaler = torch.amp.GradScaler(precision.device_type, enabled=precision.dtype == "float16")
    accum = cfg.gradient_accumulation_steps
    shape = (cfg.batch_size, cfg.block_size)
    batches = [(torch.randint(cfg.vocab_size, shape, device=precision.device),
                torch.randint(cfg.vocab_size, shape, device=precision.device)) for _ in range(accum)]
    train_model = torch.compile(model) if cfg.compile else model
    model.train()

    def steps():
        for _ in range(cfg.train_steps):
            train_step(train_model, optimizer, scaler, batches, precision, cfg.grad_clip)

    tokens = cfg.train_steps * accum * cfg.batch_size * cfg.block_size
    return [tokens / t for t in timed(steps, precision, cfg.warmup, cfg.repeats)]


def bench_sample(model, cfg: BenchConfig, precision, use_cache: bool, batch: int = 1) -> list[float]:
    """Sampling tokens/s (all sequences together) from a one-token prompt, as sample.py runs it."""
    model.eval()
    idx = torch.zeros((batch, 1), dtype=torch.long, device=precision.device)
    generator = torch.Generator(device=precision.device).manual_seed(cfg.seed)

    def sample():
        with precision.autocast():
            model.generate(idx, cfg.sample_tokens, use_cache=use_cache, generator=generator)

    return [batch * cfg.sample_tokens / t for t in timed(sample, precision, cfg.warmup, cfg.repeats)]


def row(name: str, values: list[float], unit: str, scale: float = 1.0, extra: str = "") -> str:
    med, lo, hi = statistics.median(values) / scale, min(values) / scale, max(values) / scale
    return f"{name:<26} {med:>12,.1f} {lo:>12,.1f} {hi:>12,.1f}  {unit:<12} {extra}"


def main(argv=None):
    cfg, _ = parse_config(BenchConfig, argv, prog="bench.py")
    precision = hardware.resolve(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(precision.reason)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load average {load}")

    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    model.to(precision.device)
    per_token = flops_per_token(model, cfg)
    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {per_token / 1e6:.1f} MFLOP per token, "
          f"{tokens_per_step:,} tokens per step, dropout {cfg.dropout}, compile {cfg.compile}")

    peak = matmul_peak(cfg, precision)
    train = bench_train(model, cfg, precision)
    peak_med = statistics.median(peak)
    mfu = [t * per_token / peak_med for t in train]
    ms_per_step = [tokens_per_step / t * 1000 for t in train]

    print(f"\n{'':<26} {'median':>12} {'min':>12} {'max':>12}  unit         (repeats={cfg.repeats})")
    print(row(f"matmul peak {precision.dtype}", peak, "GFLOP/s", 1e9, f"{cfg.peak_size}^3 matmul"))
    print(row("train", train, "tokens/s"))
    print(row("train step", ms_per_step, "ms"))
    print(row("train MFU", mfu, "%", 0.01, "of the measured matmul peak"))
    if not cfg.skip_sample:
        sampling = choose_precision(cfg.device, cfg.dtype)  # sample.py's choice: float32 on CPUs
        for name, use_cache, batch in [("kv cache", True, 1), ("no cache", False, 1),
                                       (f"kv cache, batch {cfg.sample_batch}", True, cfg.sample_batch)]:
            rate = bench_sample(model, cfg, sampling, use_cache, batch)
            print(row(f"sample, {name}", rate, "tokens/s", 1.0,
                      f"batch {batch}, {cfg.sample_tokens} new tokens, {sampling.dtype}"))


if __name__ == "__main__":
    hardware.set_cpu_threads()
    run_main(main)
