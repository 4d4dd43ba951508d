"""Fast token-by-token decoding on CPU: model.py's GPT with its one-token step made lean, its
block matrices in float32 or int8, and that step compiled once per model shape. On a CUDA GPU
the same lean step is captured as a CUDA graph and replayed (GraphDecoder, at the end of the
decoders).

What it supports, exactly: a model.GPT on a CPU with float32 weights and plain nn.Linear and
norm modules in its blocks (supported()), with every GPTConfig option (norm, rotary, qk_norm,
activation, untied head, bigram, x0_lambdas, value_embeds); batch sizes of 1 or more; greedy
and sampled decoding (temperature, top_k, top_p, a seeded generator); prompts and generations
of any length (model.slide_window's loop past block_size). Anything else, and any model whose
logits here differ from its own forward (matches_model, checked once), runs on model.py's
generate_stream: decoder_for says which, and why.

What it shares with model.py: the KV cache (model.KVCache: one (B, nh, block_size, hs) buffer
per layer, written in place), the generation loop and its sliding window (model.slide_window),
the prompt and every refill after a slide (the float32 model's own forward, which fills the
cache), the blocks' own norm and activation modules, and the sampling (model.sample_next).
What it adds (after gpt-fast's generate.py and quantize.py):
- step: forward for one token per row in fewer ops. At batch 1 a step is 25 matrix-vector
  products (4 per block, plus the output head) and about a hundred small ops around them,
  each costing microseconds of dispatch, so rows stay (B, C) and no module wraps the step;
- int8 weights: the block matrices quantized once with one scale per output channel
  (Int8Linear, a module swap in a copy of the model that shares its other tensors): a quarter
  of the bytes. Its kernel, torch._weight_int8pack_mm, is fast where the CPU has bf16
  instructions (AVX512-BF16, AMX) and slow elsewhere, so choose_weights times both formats on
  this CPU, at the model's shapes, and keeps the faster;
- the compiled step (CompiledStep): model.py's own forward for one token, exported
  (torch.export) and compiled by AOTInductor into a package, once per model shape, weight
  format, batch size, torch version and CPU, kept in the user's cache (cache_dir()). The
  weights are not in the package: a later process loads it and points it at its own model's
  tensors, without importing the compiler (docs/speed.md has the timings). A failed build or load
  falls back to the eager step, with one line saying so.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import durable
import errors
import model as model_module
import hardware
from hardware import failure_noted, mark_used, note_failure, prune_cache, user_cache
from model import GPT, GPTConfig, KVCache, RMSNorm, apply_rotary, slide_window

# the model options this decoder does not implement: a model that uses one of them (a value other
# than its default, GPT-2's behaviour) runs on the plain path. It implements every other
# GPTConfig field (today: all of them), and decoder_for checks its logits against the model's.
NOT_IMPLEMENTED: set[str] = set()
KNOWN_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - NOT_IMPLEMENTED
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}  # config.norm -> the module model.py builds


def supported(model: nn.Module, device_type: str = "cpu") -> str | None:
    """None when the fast decoder computes exactly this model on device_type (cpu: FastDecoder,
    cuda: GraphDecoder); else why not, in a few words."""
    if not isinstance(model, GPT):
        return f"the model is a {type(model).__name__}, not model.GPT"
    config = model.config
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in KNOWN_FIELDS and value != field.default:
            return f"model option {field.name}={value!r} is not implemented by the fast path"
    if next(model.parameters()).device.type != device_type:
        return ("the fast path is for CPUs; GPUs keep their own" if device_type == "cpu"
                else f"the model is not on a {device_type} device")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "the model's weights are not float32"
    norm = NORMS.get(getattr(config, "norm", "layernorm"))
    expected = {"ln_1": norm, "attn.c_attn": nn.Linear, "attn.c_proj": nn.Linear,
                "ln_2": norm, "mlp.c_fc": nn.Linear, "mlp.c_proj": nn.Linear}
    for i, block in enumerate(model.transformer.h):
        modules = dict(block.named_modules())
        for name, kind in expected.items():
            if kind is None or type(modules.get(name)) is not kind:
                return f"block {i} has no plain {getattr(kind, '__name__', config.norm)} {name}"
    return None


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 and one float scale per output row (weight-only
    quantization, symmetric, per output channel): W ~= int8 * scale. The matrix product runs
    in bf16 activations: torch._weight_int8pack_mm is slow with float32 ones."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        # (out,): the row's largest |w| -> 127 (the inf-norm: one pass, no |w| copy)
        exact = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-12).div_(127)
        # the kernel reads bf16 scales: quantize against the stored one, rounded up so that no
        # |w| / scale passes 127, and every w stays within half a step of int8 * scale
        scales = exact.to(torch.bfloat16)
        scales = torch.where(scales.float() < exact, torch.nextafter(scales, scales.new_tensor(float("inf"))), scales)
        self.register_buffer("weight", torch.div(w, scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.register_buffer("bias_bf16", None if self.bias is None else self.bias.to(torch.bfloat16))

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x (..., in), float32 or bf16 -> y (..., out) in dtype (float32 or bf16). The bias is
        added in that dtype, and the float32 one in the same op that leaves bf16."""
        if x.dim() == 2:  # (rows, in): the one-token step's shape, no reshapes
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales)
        else:
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scales)
            y = y.view(*shape[:-1], -1)  # bf16
        if self.bias is None:
            return y.to(dtype)
        return (self.bias if dtype == torch.float32 else self.bias_bf16) + y  # float32 + bf16 -> float32


def int8_available() -> bool:
    """Whether this torch build has the int8 weight-only kernel on CPU."""
    try:
        Int8Linear(nn.Linear(64, 64))(torch.zeros(1, 64))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _block_linears(block) -> list[nn.Module]:
    return [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]


@torch.no_grad()
def choose_weights(model: GPT, batch_size: int = 1, repeats: int = 7) -> tuple[str, str]:
    """'float32' or 'int8' for the block matrices, whichever runs every block's four products
    faster here at this batch size (interleaved timings, a few ms in all), and why. Measured,
    not assumed from CPU flags: without bf16 instructions the int8 kernel can be many times
    slower, and more so on a loaded host (docs/speed.md). All the blocks, as a step reads them:
    one block's matrices stay in the CPU's cache between repeats, where float32's four times
    the bytes cost less than in a step, and its timing picked float32 on CPUs where the int8
    step was much faster."""
    if not int8_available():
        return "float32", "int8 weight-only kernel not available in this torch build"
    float_linears = [lin for block in model.transformer.h for lin in _block_linears(block)]
    int8_linears = [Int8Linear(lin) for lin in float_linears]
    x = {n: torch.randn(batch_size, n) for n in {lin.in_features for lin in float_linears}}

    def run(linears):
        for lin in linears:
            lin(x[lin.weight.shape[1]])

    times = {"float32": [], "int8": []}
    run(float_linears), run(int8_linears)  # warm-up: first calls pack weights, fault pages in
    for _ in range(repeats):  # interleaved, so a burst of load from elsewhere hits both
        for name, linears in (("float32", float_linears), ("int8", int8_linears)):
            t0 = time.perf_counter()
            run(linears)
            times[name].append(time.perf_counter() - t0)
        if min(times["int8"]) > 2 * max(times["float32"]):  # clearly slower: stop early
            break
    f32, i8 = statistics.median(times["float32"]), statistics.median(times["int8"])
    figures = (f"{i8 * 1e3:.3f} ms int8 vs {f32 * 1e3:.3f} ms float32 for the {len(model.transformer.h)} "
               f"blocks' products at batch {batch_size}")
    # int8 changes the numbers a little, so it must win by 10%, in the typical run (median)
    # and in the best one (min, which other processes' load cannot inflate)
    if i8 < 0.9 * f32 and min(times["int8"]) < 0.9 * min(times["float32"]):
        return "int8", f"int8 weights ({figures}, measured on this CPU)"
    return "float32", (f"float32 weights (int8, which changes the numbers a little, is not 10% faster on this "
                       f"CPU in both the median and the best of its runs: {figures}, medians; best runs "
                       f"{min(times['int8']) * 1e3:.3f} vs {min(times['float32']) * 1e3:.3f} ms)")


def quantized(model: GPT) -> GPT:
    """A copy of model whose block matrices are Int8Linear; every other tensor (embeddings,
    norms, head, options' tables) is the model's own, shared, not copied."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    int8 = copy.deepcopy(model, memo=shared)
    for block in int8.transformer.h:
        block.attn.c_attn, block.attn.c_proj = Int8Linear(block.attn.c_attn), Int8Linear(block.attn.c_proj)
        block.mlp.c_fc, block.mlp.c_proj = Int8Linear(block.mlp.c_fc), Int8Linear(block.mlp.c_proj)
    return int8


class FastDecoder:
    """model.py's generation with a lean one-token step, its block matrices in float32 (the
    model's own) or int8 (a quantized copy), and that step compiled once per shape
    (compile_step). The prompt and refills run on the float32 model's own forward: matrix-matrix
    products, where float32 is fast and exact and int8's kernel is not."""

    def __init__(self, model: GPT, weights: str = "float32", device_type: str = "cpu"):
        assert weights in ("float32", "int8"), weights
        why = supported(model, device_type)
        assert why is None, why
        self.model = model
        self.weights = weights
        self.stepping = quantized(model) if weights == "int8" else model  # the model the step computes
        self.compiled = None  # a CompiledStep, once compile_step() built or loaded one

    def new_cache(self) -> KVCache:
        return KVCache(self.model.config.n_layer, self.model.config.block_size)

    def next_logits(self, new_tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """model.slide_window's next_logits: the step for one new token per row after cached
        ones, else (a prompt, a refill after a slide) the model's forward. (B, T) -> (B, vocab)"""
        if new_tokens.size(1) == 1 and cache.length > 0:
            return self.step(new_tokens[:, 0], cache)
        return self.model(new_tokens, kv_cache=cache)[0][:, -1]

    def step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx (B,), the tokens after the cache.length (>= 1) cached positions -> logits (B, vocab);
        their keys and values join the cache. Compiled where compile_step() made it so."""
        if self.compiled is not None:
            return self.compiled(idx, cache)
        return self.eager_step(idx, cache)

    @torch.no_grad()
    def eager_step(self, idx: torch.Tensor, cache: KVCache, at: torch.Tensor | None = None) -> torch.Tensor:
        """GPT.forward for T = 1 in fewer ops: rows stay (B, C), no module wraps a block, and
        with int8 weights the MLP's hidden layer stays bf16, the input its second kernel takes.
        at: None, or this token's position as a (1,) tensor (GraphDecoder's CUDA graph, where no
        shape may depend on the position): then its keys and values are written there and
        attention reads the whole buffers, later positions masked; the caller advances the cache."""
        model, config = self.stepping, self.stepping.config
        tr, B, pos = model.transformer, idx.size(0), cache.length
        nh, hs, C = config.n_head, config.n_embd // config.n_head, config.n_embd
        int8 = {"dtype": torch.bfloat16} if self.weights == "int8" else {}
        x = F.embedding(idx, tr.wte.weight)  # (B, C)
        where = slice(pos, pos + 1) if at is None else at  # this position, as a (1,) index
        if config.rotary:
            rope = model.rotary.cos[where], model.rotary.sin[where]  # (1, hs/2) each
        else:
            x = x + tr.wpe.weight[where]
        if config.bigram:
            x = x + F.embedding(cache.last_token * config.vocab_size + idx, model.bigram.weight)
        if at is not None:  # (1, 1, 1, block_size): the positions filled so far, this one included
            visible = (torch.arange(cache.max_length, device=at.device) <= at).view(1, 1, 1, -1)
        x0 = x
        for i, block in enumerate(tr.h):
            if config.x0_lambdas:
                x = block.lambdas[0] * x + block.lambdas[1] * x0
            q, k, v = block.attn.c_attn(block.ln_1(x)).view(B, 3, nh, 1, hs).unbind(1)  # (B, nh, 1, hs) each
            if config.value_embeds:
                v = v + F.embedding(idx, model.value_embeds[i].weight).view(B, nh, 1, hs)
            if config.qk_norm:
                q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
            if config.rotary:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if at is None:
                keys, values = cache.update(i, k, v)  # (B, nh, pos + 1, hs)
                y = F.scaled_dot_product_attention(q, keys, values)  # (B, nh, 1, hs)
            else:
                cache.k[i].index_copy_(2, at, k), cache.v[i].index_copy_(2, at, v)
                y = F.scaled_dot_product_attention(q, cache.k[i], cache.v[i], attn_mask=visible)
            x = x + block.attn.c_proj(y.view(B, C))
            x = x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x), **int8)))
        if at is None:
            cache.advance(idx[:, None])
        return F.linear(tr.ln_f(x), model.lm_head.weight)

    def compile_step(self, batch_size: int, build: bool = True, log=print, retry: bool = True) -> str:
        """Load this shape's compiled step from the cache, or (build) compile it there first;
        a stale or damaged package is built again. A build that failed is remembered beside it
        (step-KEY.failed) and not tried again unless retry (--compile=true). Returns how the
        step runs, in a few words; log(line) tells the user what takes time or failed."""
        key = step_key(self.stepping, self.weights, batch_size)
        path = step_path(key)
        failed = path.with_suffix(".failed")
        if path.exists():
            try:
                self.compiled = CompiledStep(path, key, self.stepping)
                self.check_compiled(batch_size)
                mark_used(path)
                return f"compiled step loaded from {path}"
            except Exception as e:  # noqa: BLE001 (any failure to load means: build it again)
                self.compiled = None
                log(f"the compiled decoding step {path} is stale or damaged ({one_line(e)}); building it again")
        if not build:
            return "eager step (--compile=true compiles it once for this model shape)"
        if not retry and (why := failed_before(failed)):
            log(f"the decoding step failed to compile here before ({why}); decoding with the eager step "
                f"(--compile=true tries again)")
            return "eager step (its compile failed before)"
        log(f"compiling the decoding step for this model shape, once: a minute or more on a small CPU "
            f"(later runs load it from {path})")
        t0 = time.perf_counter()
        try:
            build_step(self.stepping, batch_size, key, path)
            self.compiled = CompiledStep(path, key, self.stepping)
            self.check_compiled(batch_size)
            with contextlib.suppress(OSError):
                failed.unlink(missing_ok=True)
            prune_cache(path, "step-*.pt2")  # steps unused for a month: other shapes, older code
        except Exception as e:  # noqa: BLE001 (no compiler, an op it lacks...: decode eagerly)
            self.compiled = None
            why = one_line(e)
            build_failed = errors.build_failed(e)
            if build_failed and (space := errors.space_in_python_path()):
                why += f"; {space}"
            log(f"could not compile the decoding step ({why}); decoding with the eager step")
            if build_failed:  # the machine's, not the step's: remembered, so later runs skip the same minute
                note_failure(failed, why, build_environment())
            return "eager step (its compile failed)"
        return f"step compiled in {time.perf_counter() - t0:.0f} s, kept in {path}"

    @torch.no_grad()
    def check_compiled(self, batch_size: int):
        """Raise unless the compiled step gives the eager step's logits on a few tokens."""
        config = self.model.config
        T = min(4, config.block_size)
        idx = torch.arange(batch_size * T).remainder(config.vocab_size).view(batch_size, T)
        got, expected = self.new_cache(), self.new_cache()
        self.model(idx[:, :-1], kv_cache=got), self.model(idx[:, :-1], kv_cache=expected)
        a, b = self.compiled(idx[:, -1], got), self.eager_step(idx[:, -1], expected)
        if not (a - b).abs().max().item() <= 2e-2 * (b.abs().max().item() + 1.0):
            raise RuntimeError("its logits differ from the eager step's")

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        generator=None, use_cache=True, min_p=0.0, repetition_penalty=1.0):
        """GPT.generate_stream's contract, in the same loop (model.slide_window): yields the
        next token ids (B,). use_cache=False is the model's own no-cache loop."""
        if not use_cache:
            yield from self.model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                                  generator, use_cache=False, min_p=min_p,
                                                  repetition_penalty=repetition_penalty)
            return
        yield from slide_window(self.next_logits, self.model.config.block_size, self.new_cache(), idx,
                                max_new_tokens, temperature, top_k, top_p, generator, min_p, repetition_penalty)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + max_new_tokens), as GPT.generate."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


def cast_linears(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of model whose block matrices and output head are in dtype, the autocast dtype a
    GPU decodes in; every other tensor is the model's own, shared. Autocast would cast them to
    that dtype at every use (the same values); cast once, a step reads half the bytes and a CUDA
    graph reads tensors that outlive it (autocast's own cast cache is emptied when it exits)."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    low = copy.deepcopy(model, memo=shared)
    for linear in [lin for block in low.transformer.h for lin in _block_linears(block)] + [low.lm_head]:
        for name in ("weight", "bias"):
            if getattr(linear, name) is not None:  # a new tensor in the copy only: the model keeps its own
                setattr(linear, name, nn.Parameter(getattr(linear, name).detach().to(dtype), requires_grad=False))
    return low


class GraphDecoder(FastDecoder):
    """CUDA GPUs: FastDecoder's one-token step captured once as a CUDA graph and replayed for
    every token. A small model's step on a GPU is a hundred kernel launches of a few
    microseconds each around little work, so the GPU waits on Python (launch-bound); a replay
    is one launch. A graph has fixed shapes and addresses: the step writes at a position held in
    a tensor and attends over the whole cache with later positions masked (eager_step's `at`),
    so one graph serves every position of a generation. It reads that generation's cache
    buffers where they were at capture: a step on other buffers (the next generation, or two
    generations stepped in turn) captures again, a few milliseconds. Under autocast the step runs on a copy
    of the model with its matrices already in the autocast dtype (cast_linears): the values
    autocast gives, without a cast per step. The prompt and refills run on the model's forward."""

    def __init__(self, model: GPT, precision: hardware.Precision):
        super().__init__(model, "float32", precision.device_type)
        self.device_type, self.dtype = precision.device_type, precision.torch_dtype
        if self.dtype != torch.float32:
            self.stepping = cast_linears(model, self.dtype)
        self.lock = threading.Lock()  # app.py's endpoints may step two generations on two threads
        self.graph = None  # torch.cuda.CUDAGraph, captured on the first step (capture())
        self.captured: tuple[int, ...] = ()  # where the cache buffers it reads are (buffers())
        self.inputs: dict[str, torch.Tensor] = {}  # what a replay reads: idx, at, last_token
        self.logits: torch.Tensor | None = None  # what a replay writes

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)  # nothing cached across replays

    def new_cache(self) -> KVCache:
        return KVCache(self.model.config.n_layer, self.model.config.block_size, zeros=True)  # read whole, masked

    def step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        with self.lock:  # one graph, its inputs and output: one step at a time
            if self.graph is None or self.inputs["idx"].shape != idx.shape or self.captured != buffers(cache):
                self.capture(idx, cache)
            self.inputs["idx"].copy_(idx)
            self.inputs["at"].fill_(cache.length)
            self.inputs["last_token"].copy_(cache.last_token if cache.last_token is not None else idx)
            self.graph.replay()
            cache.advance(idx[:, None])
            return self.logits.clone()  # the next replay overwrites it

    def capture(self, idx: torch.Tensor, cache: KVCache):
        """Record eager_step at a tensor position over cache's buffers (record())."""
        self.inputs = {"idx": idx.clone(), "at": torch.tensor([cache.length], device=idx.device),
                       "last_token": (cache.last_token if cache.last_token is not None else idx).clone()}
        view = KVCache(len(cache.k), cache.max_length)  # the same buffers, the static last_token
        view.k, view.v, view.last_token = list(cache.k), list(cache.v), self.inputs["last_token"]

        def run():
            with self.autocast():
                return self.eager_step(self.inputs["idx"], view, at=self.inputs["at"])

        self.graph = None  # the last capture's memory is freed before the next one takes its own
        self.graph, self.logits = record(run, idx.device)
        self.captured = buffers(cache)

    @torch.no_grad()
    def matches_model(self, batch_size: int, tokens: int = 8) -> bool:
        """Whether replays give the model's own logits (under the same autocast) on a few tokens
        (a prompt, then a token at a time): the guard against a model or GPU this gets wrong."""
        model = self.model
        T = min(tokens, model.config.block_size)  # at least 2: graph_decoder_for
        idx = torch.arange(batch_size * T, device=model.lm_head.weight.device).remainder(
            model.config.vocab_size).view(batch_size, T)
        cache = self.new_cache()
        with self.autocast():
            expected = model(idx, idx)[0][:, 1:].float()  # (B, T - 1, vocab): targets ask for every position
            model(idx[:, :1], kv_cache=cache)
        got = torch.stack([self.step(idx[:, t], cache).float() for t in range(1, T)], dim=1)
        return (got - expected).abs().max().item() <= 2e-2 * (expected.abs().max().item() + 1.0)


def record(run, device: torch.device):
    """run() captured as a CUDA graph: (graph, its output), which graph.replay() rewrites in
    place. One warm-up run first, on a side stream, as torch.cuda.graph asks (it picks kernels
    and allocates workspaces); GraphDecoder's warm-up writes the step's keys and values where
    the replay then writes them again."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls go on
        output = run()
    return graph, output


def buffers(cache: KVCache) -> tuple[int, ...]:
    """Where cache's buffers are: what a captured step reads."""
    return tuple(t.data_ptr() for t in cache.k + cache.v)


def one_token_block(model: GPT) -> str | None:
    """Why a model of block_size 1 gains nothing here: every token refills its window (the
    model's forward), so there is no one-token step to speed up; else None."""
    return "a block of one token: every token refills the window" if model.config.block_size < 2 else None


def graph_decoder_for(model: nn.Module, precision: hardware.Precision, batch_size: int, log=print):
    """A GraphDecoder where it applies and agrees with the model, else the model itself (with
    one line saying why, where something failed). Returns (decoder, how it decodes, in words)."""
    why = supported(model, precision.device_type) or one_token_block(model)
    if why is not None:
        return model, f"model.generate_stream ({why})"
    try:
        decoder = GraphDecoder(model, precision)
        agrees = decoder.matches_model(batch_size)
    except Exception as e:  # noqa: BLE001 (an op this torch or GPU cannot capture: decode eagerly)
        log(f"could not capture the decoding step as a CUDA graph ({one_line(e)}); decoding with the model's own step")
        return model, "model.generate_stream (the CUDA graph failed)"
    if not agrees:
        return model, "model.generate_stream (the CUDA graph's logits differ from this model's own)"
    return decoder, "the one-token step as a CUDA graph (--compile=false: the model's own)"


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ---------------------------------------------------------------------------- the compiled step

def cache_dir() -> Path:
    """Where compiled steps are kept: the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return user_cache("decode")


def step_key(model: GPT, weights: str, batch_size: int) -> str:
    """What a compiled step depends on, as JSON: the model's shape and options, the weight
    format, the batch size, torch, the CPU's instruction set, and the code it was built from
    (model.py, this file), so that an edit to either builds it again."""
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (model_module, sys.modules[__name__])))
    return json.dumps({"config": {k: v for k, v in dataclasses.asdict(model.config).items() if k != "dropout"},
                       "weights": weights, "batch_size": batch_size, "torch": torch.__version__,
                       "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
                       "code": code.hexdigest()}, sort_keys=True)


def step_path(key: str) -> Path:
    """The package of the compiled step for step_key's key, in cache_dir()."""
    return cache_dir() / f"step-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"


class OneToken(nn.Module):
    """What is compiled: model.py's own forward for one token per row after pos >= 1 cached
    positions, over a KVCache made of the given buffers (written in place)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, pos, last_token, keys, values):
        """idx (B,), pos () int64, last_token (B,), keys and values one (B, nh, block_size, hs)
        per layer -> logits (B, vocab)"""
        block_size = self.model.config.block_size
        cache = KVCache(len(keys), block_size)
        position = pos.item()  # symbolic in the graph: one graph serves every position
        torch._check(position >= 1)
        torch._check(position < block_size)
        cache.k, cache.v, cache.length, cache.last_token = list(keys), list(values), position, last_token
        return self.model(idx[:, None], kv_cache=cache)[0][:, -1]


def build_step(model: GPT, batch_size: int, key: str, path: Path):
    """Export OneToken(model) and compile it with AOTInductor into the package at path (written
    to a temporary file and renamed: a killed build leaves no half-written package). The
    weights stay out of the package (CompiledStep points it at a model's own); key goes into its
    metadata, so a package built for anything else is recognised as stale."""
    from torch._inductor import aoti_compile_and_package  # the compiler: imported only to build

    config = model.config
    nh, hs = config.n_head, config.n_embd // config.n_head
    ids = torch.zeros(batch_size, dtype=torch.long)
    buffers = [[torch.zeros(batch_size, nh, config.block_size, hs) for _ in range(config.n_layer)] for _ in range(2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not the user's business
            program = torch.export.export(OneToken(model).eval(), (ids, torch.tensor(1), ids.clone(), *buffers),
                                            strict=False)  # distinct tensors: inputs that alias are exported as one
            aoti_compile_and_package(program, package_path=str(partial), inductor_configs={
                "aot_inductor.package_constants_in_so": False, "aot_inductor.metadata": {"key": key},
                # small weights (x0_lambdas) stay inputs too, never values written into the code
                "always_keep_tensor_constants": True})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class CompiledStep:
    """A compiled step's package, loaded with the AOTInductor runtime alone (no compiler import)
    and pointed at model's own tensors (no copy): step(idx (B,), cache) -> logits (B, vocab)."""

    def __init__(self, path: Path, key: str, model: GPT):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        built_for = self.loader.get_metadata().get("key")
        if built_for != key:
            raise RuntimeError("it was built for another model shape, torch, CPU or code")
        tensors = {**dict(model.named_parameters(remove_duplicate=False)),
                   **dict(model.named_buffers(remove_duplicate=False))}
        self.loader.load_constants({name: tensors[name.removeprefix("model.")]
                                    for name in self.loader.get_constant_fqns()}, False, True, True)
        self.model = model  # the runtime reads its tensors: keep them alive

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        last = cache.last_token if cache.last_token is not None else idx
        inputs = [idx.contiguous(), torch.tensor(cache.length), last.contiguous(), *cache.k, *cache.v]
        logits = self.loader.run(inputs)[0]  # the keys and values are written into cache's buffers
        cache.advance(idx[:, None])
        return logits


@torch.no_grad()
def matches_model(decoder: FastDecoder, tokens: int = 8, tolerance: float = 1e-3) -> bool:
    """Whether the eager step in float32 gives the model's own logits on a few tokens (a
    prompt, then one more token): the guard against a model this file would compute wrongly."""
    model = decoder.model
    reference = FastDecoder(model, "float32") if decoder.weights != "float32" else decoder
    T = max(2, min(tokens, model.config.block_size))
    idx = torch.arange(T).remainder(model.config.vocab_size)[None]  # (1, T)
    expected = model(idx)[0][:, -1]  # (1, vocab): the last position
    cache = reference.new_cache()
    model(idx[:, :-1], kv_cache=cache)  # the first T - 1 positions into the cache
    got = reference.eager_step(idx[:, -1], cache)  # the step generation runs on
    return (got - expected).abs().max().item() <= tolerance * (expected.abs().max().item() + 1.0)


# a compiled step pays for loading it (docs/speed.md#sampling) when a generation runs at least
# this many token-layers (max_new_tokens x n_layer); shorter ones stay eager unless --compile
COMPILE_PAYS = 2000


def auto_weights(model: GPT, batch_size: int, compile: bool | None) -> tuple[str, str]:
    """float32 or int8 block matrices for --fast_weights=auto, and why: the same in every process
    of this model shape on this CPU, since the two give slightly different numbers and a seed
    must give the same text every time. A format whose compiled step is kept wins (that step
    beats the eager gap between the formats); else the first process's timing (choose_weights),
    kept in the cache beside the compiled steps for the processes after it."""
    formats = ["int8", "float32"] if int8_available() else ["float32"]
    compiled = [w for w in formats if compile is not False and step_path(step_key(model, w, batch_size)).exists()]
    if len(compiled) == 1:
        return compiled[0], f"{compiled[0]} weights (their compiled step is kept)"
    path = cache_dir() / f"weights-{hashlib.sha256(step_key(model, 'auto', batch_size).encode()).hexdigest()[:20]}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))["weights"]
        if kept in formats:
            mark_used(path)
            return kept, (f"{kept} weights (timed the first time on this CPU, kept in {path}, so that every run "
                          f"decodes alike; --fast_weights chooses)")
    except (OSError, ValueError, KeyError, TypeError):  # none kept yet, or unreadable: time them
        pass
    weights, reason = choose_weights(model, batch_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_text(path, json.dumps({"weights": weights, "why": reason}) + "\n")
        prune_cache(path, "weights-*.json")
    except OSError:  # a read-only cache: this process's choice stands alone
        pass
    return weights, reason


def build_environment() -> dict:
    """What a failed build of the compiled step depended on besides the step: this Python and
    the C++ compiler found. A marker of a failure counts only while both are the same."""
    return {"python": sys.prefix, "compiler": shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
            or shutil.which("cl")}  # (cl: MSVC, Windows' compiler, found from its Developer prompt)


def failed_before(marker: Path) -> str | None:
    """Why the build failed before in this environment (its marker), else None: a marker of
    another environment (a new virtual environment, a compiler installed since), an unreadable
    one or one over a week old is no reason not to try."""
    return failure_noted(marker, 7 * 24 * 3600, build_environment())


def decoder_for(model: nn.Module, batch_size: int, weights: str = "auto", compile: bool | None = None,
                new_tokens: int = 0, log=print):
    """What to call generate_stream on: a FastDecoder where it applies, else the model itself.
    weights: auto (choose_weights), float32 or int8. compile: True (load or build the compiled
    step), False (eager), None (load it when kept; build it when a generation of new_tokens
    is long enough to pay: COMPILE_PAYS). Returns (decoder, why, in a few words)."""
    why = supported(model) or one_token_block(model)
    if why is not None:
        return model, f"plain ({why})"
    if weights == "auto":
        weights, reason = auto_weights(model, batch_size, compile)
    else:
        reason = f"{weights} weights (as requested)"
    decoder = FastDecoder(model, weights)
    if not matches_model(decoder):
        options = ", ".join(model.config.non_gpt2_options()) or "none beyond GPT-2"
        return model, (f"plain (the fast path's logits differ from this model's own: an option it does not "
                       f"compute? this model's options: {options}; list a new one in fast_decode.NOT_IMPLEMENTED)")
    how = f"fast CPU path, {reason}"
    if compile is not False:
        build = compile is True or new_tokens * model.config.n_layer >= COMPILE_PAYS
        how += f"; {decoder.compile_step(batch_size, build, log, retry=compile is True)}"
    return decoder, how


@torch.no_grad()
def val_loss(forward, data: torch.Tensor, block_size: int, batch_size: int = 16) -> float:
    """Mean cross-entropy of predicting every token of data (1-D ids) from the ones before it
    in its window, over consecutive windows of block_size + 1 tokens that cover all of data.
    forward(idx (B, T)) -> logits (B, T, vocab)."""
    n = (len(data) - 1) // block_size
    x = data[:n * block_size].view(n, block_size)
    y = data[1:n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = forward(x[i:i + batch_size])
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + batch_size].flatten(),
                                 reduction="sum").item()
    return total / (n * block_size)
