"""Measure how fast this machine trains and samples a model shape: no dataset needed.

    python bench.py                                  # the shakespeare_char model (6x384, block 256)
    python bench.py configs/shakespeare.py --dtype=float32
    python bench.py --skip_train --sample_tokens=500 --process_runs=3   # sampling against nanoGPT
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=12 --vocab_size=50304
    python bench.py configs/shakespeare_quick.py --skip_sample --profile   # a config's model, its step profiled

Prints, as medians over `repeats` timed runs after a warm-up:
  - matmul peak: FLOP/s of a large square matrix product in the training dtype, measured here
    because datasheets do not cover every CPU, timed just before each training sample; it is
    the denominator of that sample's MFU
  - train: tokens/s and MFU of the same step as train.py (autocast forward, backward, grad
    clip, fused AdamW) on random tokens of the config's vocabulary; on CPUs also nanoGPT's step
    (float32, torch's dropout and SDPA, unfused AdamW) timed in turn with ours, with the speed-up,
    for GPT-2's architecture (a model with the options of configs/shakespeare_cpu.py has no
    nanoGPT counterpart); --profile adds torch.profiler's table of the step's operators
  - sample: tokens/s of model.generate in sample.py's precision (float32 on CPUs), at batch 1
    with and without the KV cache, and in all for a batch of sample_batch sequences; on CPUs
    also sample.py's fast path (fast_decode.py) at batch 1 (eager, and with the step compiled:
    built once per shape into the user's cache, then loaded) and sample_batch, and nanoGPT's
    generate loop (no KV cache: the whole window every step) on the same float32 weights,
    all timed side by side (interleaved), with each rate's speed-up over nanoGPT's loop
  - sample.py process (CPUs, --process_runs > 0): the wall time of whole sampling processes
    of sample_tokens tokens on a checkpoint of this model: nanoGPT's sample.py (its steps and
    loop, NANOGPT_SAMPLE), ours (the default), --compile=false and --dtype=float32, interleaved: the
    first run of each, then the median of the others, each with its speed-up over nanoGPT's
Any train.py config file or flag works here; the few extra keys are listed by --help.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while torch imports: one line, no traceback
import gc
gc.disable()  # no garbage collection while torch imports: start-up and exit ~0.3 s faster (docs/speed.md)
import contextlib
import copy
import dataclasses
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

import checkpoint
import cpu_kernels
import fast_decode
import hardware
from config import parse_config
from errors import run_main
from loading import choose_precision
from model import GPT, MODEL_KEYS, GPTConfig
from training import TrainConfig, train_step
gc.freeze()  # what the imports made is never traversed again, not even at exit
gc.enable()


@dataclass
class BenchConfig(TrainConfig):
    """Settings of bench.py: every train.py key (so its config files load) plus the ones below."""
    MOVED: ClassVar[dict[str, str]] = {  # former settings: where their job went
        "quant_eval": "what int8 weights cost in val loss is eval.py's now: python eval.py --out_dir=OUT_DIR --int8"}
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
    skip_train: bool = False  # measure sampling only (no matmul peak, no training step)
    process_runs: int = 0  # whole `python sample.py` processes per variant (cpu; 0 = none, 5 = first + 4 repeats)
    profile: bool = False  # also print torch.profiler's table of the training step's operators
    sample_compile: bool = True  # also time the fast path's compiled step (built once per shape into the cache, then loaded)
    numpy_kernels: bool = False  # cpu: also time our step on the numpy dropout path (a machine without a C compiler's), interleaved
    glibc_malloc: bool = False  # cpu: also time our step with glibc's own malloc setting (train.py keeps freed memory), interleaved

    def problems(self) -> list[str]:
        p = super().problems()
        for k in ["vocab_size", "repeats", "train_steps", "sample_tokens", "sample_batch", "peak_size"]:
            if getattr(self, k) < 1:
                p.append(f"--{k} must be at least 1, got {getattr(self, k)}")
        if self.warmup < 0:
            p.append(f"--warmup must be >= 0, got {self.warmup}")
        if self.process_runs < 0:
            p.append(f"--process_runs must be >= 0, got {self.process_runs}")
        if self.skip_train and self.skip_sample and not self.process_runs:
            p.append("--skip_train and --skip_sample leave nothing to measure: drop one, or add "
                     "--process_runs=N to time whole sample.py processes")
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


def flops_per_token(model: GPT, cfg: BenchConfig) -> int:
    """Training FLOPs per token: 6N for the weights' forward and backward, plus attention's
    12 * n_layer * n_embd * block_size (PaLM appendix B, as in nanoGPT's estimate_mfu)."""
    return 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def nanogpt_optimizer(model: GPT, cfg: BenchConfig) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers on a CPU: AdamW with weight decay on the parameters of 2 or
    more dimensions, torch's default (unfused) implementation: nanoGPT fuses only on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def bench_train(model, cfg: BenchConfig, precision) -> dict[str, list[float]]:
    """Training tokens/s, one sample per repeat, of train.py's train_step on random tokens, and
    the matmul peak: FLOP/s of (n, n) @ (n, n) in the autocast dtype, repeated for about as
    long as a step and timed just before each training sample, so that MFU pairs a step with
    the peak of the same stretch of time (on a shared host both move with the load). On CPUs also nanoGPT's step on a copy of the model, timed in
    turn with ours (interleaved): float32 (nanoGPT's train.py autocasts only on GPUs), torch's dropout and SDPA
    (cpu_kernels.torch_kernels), unfused AdamW, not compiled (nanoGPT's CPU command passes
    --compile=False). Both run with train.py's malloc setting (hardware.keep_freed_memory), which
    spares nanoGPT's step the page faults glibc's own setting gives it. The model is GPT-2's
    architecture in both, so the work is the same."""
    scaler = torch.amp.GradScaler(precision.device_type, enabled=precision.dtype == "float16")
    accum = cfg.gradient_accumulation_steps
    shape = (cfg.batch_size, cfg.block_size)
    batches = [(torch.randint(cfg.vocab_size, shape, device=precision.device),
                torch.randint(cfg.vocab_size, shape, device=precision.device)) for _ in range(accum)]

    def stepper(model, optimizer, precision, kernels=contextlib.nullcontext, keep_memory=True):
        model.train()

        def steps():
            if not keep_memory:  # glibc's own malloc setting for this run only
                hardware.keep_freed_memory(False)
            with kernels():
                for _ in range(cfg.train_steps):
                    train_step(model, optimizer, scaler, batches, precision, cfg.grad_clip)
            if not keep_memory:
                hardware.keep_freed_memory(True)
        return steps

    n, products = cfg.peak_size, 1  # products: matmuls per peak sample, set to last about a step below
    a, b = (torch.randn(n, n, device=precision.device, dtype=precision.torch_dtype) for _ in range(2))

    def peak():
        for _ in range(products):
            a @ b

    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                          precision.device_type, cfg.optimizer)
    runs = {"matmul peak": peak,
            "train": stepper(torch.compile(model) if cfg.compile else model, optimizer, precision)}
    if precision.device_type == "cpu" and cfg.numpy_kernels:  # the same model and optimizer, numpy's dropout
        runs["train, numpy kernels"] = stepper(model, optimizer, precision, cpu_kernels.without_c)
    if precision.device_type == "cpu" and cfg.glibc_malloc:  # the same step, freed memory handed back
        runs["train, glibc's malloc"] = stepper(model, optimizer, precision, keep_memory=False)
    if precision.device_type == "cpu" and not model.config.non_gpt2_options():  # nanoGPT's model is GPT-2's
        baseline = copy.deepcopy(model)
        runs["train, nanoGPT's step"] = stepper(baseline, nanogpt_optimizer(baseline, cfg),
                                                hardware.Precision("cpu", "float32", "nanoGPT on a CPU"),
                                                cpu_kernels.torch_kernels)
    if precision.device_type == "cpu":  # as train.py does (nanoGPT's step too: generous to it)
        hardware.keep_freed_memory()
    for fn in runs.values():
        timed(fn, precision, cfg.warmup, 0)
    # a peak sample as long as a step, so both see the same stretch of a shared host's load
    products = max(1, round(timed(runs["train"], precision, 0, 1)[0] / timed(peak, precision, 0, 1)[0]))
    times = {name: [] for name in runs}
    for _ in range(cfg.repeats):
        for name, fn in runs.items():
            times[name] += timed(fn, precision, 0, 1)
            if name == "train, glibc's malloc":  # it handed the kept memory back: an untimed step refills it
                runs["train"]()
    if cfg.profile:  # where a step's time goes, by operator (self time: the op's own work)
        with torch.profiler.profile() as prof:
            runs["train"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    tokens = cfg.train_steps * accum * cfg.batch_size * cfg.block_size
    rates = {name: [tokens / t for t in ts] for name, ts in times.items()}
    rates["matmul peak"] = [2 * n**3 * products / t for t in times["matmul peak"]]
    if precision.device_type == "cpu":
        hardware.keep_freed_memory(False)  # sampling runs as sample.py does, with glibc's own setting
    return rates


def bench_sample(generate, cfg: BenchConfig, precision, batch: int = 1) -> list[float]:
    """Sampling tokens/s (all sequences together) from a one-token prompt, as sample.py runs it:
    generate(idx, max_new_tokens, generator=...) under the run's autocast."""
    idx = torch.zeros((batch, 1), dtype=torch.long, device=precision.device)
    generator = torch.Generator(device=precision.device).manual_seed(cfg.seed)

    def sample():
        with precision.autocast():
            generate(idx, cfg.sample_tokens, generator=generator)

    return [batch * cfg.sample_tokens / t for t in timed(sample, precision, cfg.warmup, cfg.repeats)]


@torch.inference_mode()
def nanogpt_generate(model, idx, max_new_tokens, temperature=0.8, top_k=200, generator=None):
    """nanoGPT's GPT.generate, as its sample.py runs it (on CPU: float32, no autocast): crop to
    the last block_size tokens, a whole forward without a cache every step, logits of the last
    position / temperature, top-k by torch.topk, softmax, torch.multinomial, torch.cat."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size else idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = torch.nn.functional.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def bench_sample_side_by_side(model, cfg: BenchConfig) -> dict[str, tuple[list[float], str]]:
    """CPU sampling tokens/s of model.py's float32 path, the fast path (sample.py's default)
    and nanoGPT's loop, timed in turn within each repeat, so load from other processes falls
    on all of them alike. Returns {row name: (rates, note)}."""
    model.eval()
    fast, why = {}, {}
    for batch in (1, cfg.sample_batch):  # the eager step: no compile of a second batch size here
        fast[batch], why[batch] = fast_decode.decoder_for(model, batch, compile=False)
    int8 = fast_decode.FastDecoder(model, "int8") if fast_decode.int8_available() else None
    n, options = cfg.sample_tokens, dict(temperature=0.8, top_k=200)
    idx = {b: torch.zeros((b, 1), dtype=torch.long) for b in (1, cfg.sample_batch)}
    generator = torch.Generator().manual_seed(cfg.seed)
    variants = {  # name: (function, batch, note)
        "sample, nanoGPT loop": (lambda: nanogpt_generate(model, idx[1], n, generator=generator, **options), 1,
                                 "nanoGPT's generate loop (no KV cache), float32"),
        "sample, kv cache": (lambda: model.generate(idx[1], n, generator=generator, **options), 1,
                                     "model.generate_stream (--dtype=float32)"),
        "sample, fast path, eager step": (lambda: fast[1].generate(idx[1], n, generator=generator, **options), 1,
                                          f"sample.py --compile=false: {why[1]}"),
        f"sample, kv cache, batch {cfg.sample_batch}": (
            lambda: model.generate(idx[cfg.sample_batch], n, generator=generator, **options), cfg.sample_batch,
            "model.generate_stream, tokens/s of all sequences"),
        f"sample, fast path, batch {cfg.sample_batch}": (
            lambda: fast[cfg.sample_batch].generate(idx[cfg.sample_batch], n, generator=generator, **options),
            cfg.sample_batch, f"all sequences; {why[cfg.sample_batch]}"),
    }
    if int8 is not None:
        variants["sample, int8 weights"] = (lambda: int8.generate(idx[1], n, generator=generator, **options), 1,
                                            "the fast path's eager step with --fast_weights=int8")
    if cfg.sample_compile:  # sample.py's default for long generations: built once, then loaded
        compiled, how = fast_decode.decoder_for(model, 1, compile=True)
        if isinstance(compiled, fast_decode.FastDecoder) and compiled.compiled is not None:
            variants["sample, fast path, compiled step"] = (
                lambda: compiled.generate(idx[1], n, generator=generator, **options), 1,
                f"sample.py's default: {how}")
    rates = {name: [] for name in variants}
    for fn, _, _ in variants.values():
        for _ in range(cfg.warmup):
            fn()
    for _ in range(cfg.repeats):
        for name, (fn, batch, _) in variants.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(batch * n / (time.perf_counter() - t0))
    return {name: (rates[name], f"batch {batch}, {n} new tokens, {note}")
            for name, (_, batch, note) in variants.items()}


# nanoGPT's sample.py as a process, for the whole-process comparison: import torch and the model
# (ours is nanoGPT's architecture), torch.load the checkpoint, build the model, load the weights,
# generate the nanoGPT way (nanogpt_generate's loop, float32 on CPU), decode and print
NANOGPT_SAMPLE = """
import sys
import torch
from torch.nn import functional as F
from model import GPT, GPTConfig
out_dir, max_new_tokens, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(seed)
ckpt = torch.load(out_dir + '/ckpt.pt', map_location='cpu', weights_only=True)
model = GPT(GPTConfig(**ckpt['model_args']))
model.load_state_dict(ckpt['model'])
model.eval()
chars = ckpt['tokenizer']['chars']
idx = torch.tensor([[chars.index('!')]])
with torch.no_grad():
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size else idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / 0.8
        v, _ = torch.topk(logits, min(200, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
        idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
print(''.join(chars[i] for i in idx[0].tolist()))
"""


def bench_sample_process(model, cfg: BenchConfig) -> dict[str, list[float]]:
    """Seconds of whole sampling processes (start-up, loading, sample_tokens tokens from a
    one-character prompt, temperature 0.8, top-k 200) on a checkpoint of this model: nanoGPT's
    sample.py (NANOGPT_SAMPLE), ours (the default), ours with --compile=false and ours with
    --dtype=float32, in turn. The
    first run of each is the cold one (a fresh process, nothing of it cached but the OS's files),
    then the others."""
    chars = [chr(0x21 + i) for i in range(cfg.vocab_size)]  # a char tokenizer of the vocabulary
    root = Path(__file__).resolve().parent
    times: dict[str, list[float]] = {"nanoGPT sample.py": [], "sample.py": [], "sample.py --compile=false": [],
                                     "sample.py --dtype=float32": []}
    with tempfile.TemporaryDirectory() as out_dir:
        checkpoint.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                         "optimizer": {}, "iter_num": 0, "best_val_loss": float("inf"), "config": {},
                         "tokenizer": {"name": "char", "vocab_size": len(chars), "eot_id": None, "chars": chars}},
                        Path(out_dir) / "ckpt.pt")
        commands = {
            "nanoGPT sample.py": [sys.executable, "-c", NANOGPT_SAMPLE, out_dir, str(cfg.sample_tokens), str(cfg.seed)],
            "sample.py": [sys.executable, str(root / "sample.py"), f"--out_dir={out_dir}", "--prompt=!",
                          "--device=cpu", f"--max_new_tokens={cfg.sample_tokens}", f"--seed={cfg.seed}"],
        }
        commands["sample.py --compile=false"] = commands["sample.py"] + ["--compile=false"]
        commands["sample.py --dtype=float32"] = commands["sample.py"] + ["--dtype=float32"]
        for _ in range(cfg.process_runs):
            for name, command in commands.items():
                t0 = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, timeout=3600, cwd=root)
                times[name].append(time.perf_counter() - t0)
    return times


def row(name: str, values: list[float], unit: str, scale: float = 1.0, extra: str = "") -> str:
    med, lo, hi = statistics.median(values) / scale, min(values) / scale, max(values) / scale
    return f"{name:<38} {med:>12,.1f} {lo:>12,.1f} {hi:>12,.1f}  {unit:<12} {extra}"


def main(argv=None):
    cfg, _ = parse_config(BenchConfig, argv, prog="bench.py")
    precision = hardware.resolve(cfg.device, cfg.dtype)
    hardware.set_determinism(cfg.deterministic, precision.device_type)  # to time what it costs on a GPU
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(precision.reason)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load average {load}")
    if precision.device_type == "cpu":
        print(f"CPU training kernels: {cpu_kernels.kernels_used()}" + (" (dropout 0: the model's other options use them)"
                                                                       if not cfg.dropout else ""))

    model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}, vocab_size=cfg.vocab_size, dropout=cfg.dropout))
    model.to(precision.device)
    per_token = flops_per_token(model, cfg)
    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {per_token / 1e6:.1f} MFLOP per token, "
          f"{tokens_per_step:,} tokens per step, dropout {cfg.dropout}, compile {cfg.compile}, "
          f"options beyond GPT-2: {', '.join(model.config.non_gpt2_options()) or 'none'}"
          + (" (so no nanoGPT rows: its model is GPT-2's)" if model.config.non_gpt2_options() else ""))

    print(f"\n{'':<38} {'median':>12} {'min':>12} {'max':>12}  unit         (repeats={cfg.repeats})")
    if not cfg.skip_train:
        trains = bench_train(model, cfg, precision)
        train, peak = trains["train"], trains["matmul peak"]
        mfu = [t * per_token / p for t, p in zip(train, peak)]  # each step against the peak timed beside it
        ms_per_step = [tokens_per_step / t * 1000 for t in train]
        print(row(f"matmul peak {precision.dtype}", peak, "GFLOP/s", 1e9, f"{cfg.peak_size}^3 matmul"))
        print(row("train", train, "tokens/s"))
        print(row("train step", ms_per_step, "ms"))
        print(row("train MFU", mfu, "%", 0.01, "of the matmul peak timed beside each sample"))
        if "train, numpy kernels" in trains:
            numpy_rates = trains["train, numpy kernels"]
            gain = statistics.median(train) / statistics.median(numpy_rates)
            print(row("train, numpy kernels", numpy_rates, "tokens/s", 1.0,
                      f"the C kernels' step is {gain:.2f}x this; the same step without a C compiler"))
        if "train, glibc's malloc" in trains:
            plain = trains["train, glibc's malloc"]
            gain = statistics.median(train) / statistics.median(plain)
            print(row("train, glibc's malloc", plain, "tokens/s", 1.0,
                      f"the step with freed memory kept is {gain:.2f}x this (hardware.keep_freed_memory)"))
        if "train, nanoGPT's step" in trains:
            nanogpt = trains["train, nanoGPT's step"]
            speedup = statistics.median(train) / statistics.median(nanogpt)
            print(row("train, nanoGPT's step", nanogpt, "tokens/s", 1.0,
                      f"ours is {speedup:.1f}x; float32, torch's dropout and SDPA, unfused AdamW"))
            print(row("train MFU, nanoGPT's step", [t * per_token / p for t, p in zip(nanogpt, peak)], "%",
                      0.01, "of the same peaks"))
    sampling = choose_precision(cfg.device, cfg.dtype)  # sample.py's choice: float32 on CPUs
    if not cfg.skip_sample and sampling.device_type != "cpu":
        model.eval()
        graphs = {b: fast_decode.graph_decoder_for(model, sampling, b)[0] for b in (1, cfg.sample_batch)
                  if sampling.device_type == "cuda"}
        variants = [("nanoGPT loop", lambda *a, **k: nanogpt_generate(model, *a, **k), 1, "no KV cache"),
                    ("no cache", functools.partial(model.generate, use_cache=False), 1, "model.py's loop"),
                    ("kv cache", model.generate, 1, "model.generate_stream (sample.py --compile=false)")]
        variants += [(f"kv cache, batch {cfg.sample_batch}", model.generate, cfg.sample_batch, "model.generate_stream")]
        variants += [(f"cuda graph{'' if b == 1 else f', batch {b}'}", g.generate, b, "sample.py's default")
                     for b, g in graphs.items() if isinstance(g, fast_decode.GraphDecoder)]
        for name, generate, batch, note in variants:
            rate = bench_sample(generate, cfg, sampling, batch)
            print(row(f"sample, {name}", rate, "tokens/s", 1.0,
                      f"batch {batch}, {cfg.sample_tokens} new tokens, {sampling.dtype}; {note}"))
    elif not cfg.skip_sample:
        results = bench_sample_side_by_side(model.cpu(), cfg)
        baseline = statistics.median(results["sample, nanoGPT loop"][0])
        for name, (rates, note) in results.items():
            speedup = statistics.median(rates) / baseline
            print(row(name, rates, "tokens/s", 1.0, f"{speedup:.1f}x nanoGPT's loop; {note}"))
    if cfg.process_runs and sampling.device_type == "cpu":
        times = bench_sample_process(model.cpu(), cfg)
        nanogpt = times["nanoGPT sample.py"]
        for name, seconds in times.items():
            print(row(f"{name}, first run", seconds[:1], "s", 1.0,
                      f"{nanogpt[0] / seconds[0]:.1f}x nanoGPT's; whole process, {cfg.sample_tokens} tokens"))
            if len(seconds) > 1:
                speedup = statistics.median(nanogpt[1:]) / statistics.median(seconds[1:])
                print(row(f"{name}, repeated", seconds[1:], "s", 1.0, f"{speedup:.1f}x nanoGPT's; the runs after the first"))


if __name__ == "__main__":
    hardware.set_cpu_threads()
    run_main(main)
