"""Fast token-by-token decoding on CPU: a lean decode step over a static KV cache, with the
block matrices in float32 or as int8 weight-only linears, whichever this CPU runs faster.

At batch 1 a decoder step is 25 matrix-vector products (4 per block, plus the output head)
and about a hundred small ops around them; every op costs a few microseconds of dispatch, so
the step below does only what decoding needs (after gpt-fast's generate.py and quantize.py):
- one key/value buffer per layer, (B, nh, block_size, hs), allocated once per generation and
  written in place at the position; a new token attends (SDPA) over the buffer up to it;
- the weights are read straight from the model (float32: no copy), or quantized once to int8
  with one scale per output channel (Int8Linear, a module swap): a quarter of the bytes. Its
  kernel, torch._weight_int8pack_mm, is fast where the CPU has bf16 instructions
  (AVX512-BF16, AMX) and slow elsewhere, so choose_weights times both formats on this CPU, at
  the model's shapes, and keeps the faster (the choice and the figures are printed);
- the embeddings, LayerNorms, residual stream, attention and the output head stay float32.

FastDecoder.generate_stream takes the same arguments and yields the same values as
GPT.generate_stream (model.py), including the sliding window past block_size, so whatever
consumes one (sample.py, the interactive prompt, a web demo) takes the other. The model's
config is checked first (supported()), and the decoder's float32 logits are compared once
with the model's own forward: any model this file does not know falls back to the plain path.

The one-token step (step) is forward for T = 1 in fewer ops. compile_step (sample.py and app.py
--compile) builds it with torch.compile, for long generations and sessions: on our loaded 2-core
AVX2 EPYC, 5.2-5.5 ms of CPU time per token against 6.4-6.9 eager (6x384, int8), after 50-105 s
to compile the first time and 13-47 s from inductor's cache, so it is never the default.
"""
import dataclasses
import math
import os
import statistics
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, GPTConfig, apply_rotary, sample_next

# the model options this decoder does not implement: a model that uses one of them (a value other
# than its default, GPT-2's behaviour) runs on the plain path. It implements every other
# GPTConfig field, and decoder_for checks its logits against the model's before using it.
NOT_IMPLEMENTED = {"x0_lambdas", "value_embeds"}
KNOWN_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - NOT_IMPLEMENTED
ACTIVATIONS = {  # config.activation -> the MLP's activation, as model.ACTIVATIONS computes it
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}  # config.norm -> the module model.py builds


def supported(model: nn.Module) -> str | None:
    """None when the fast decoder computes exactly this model; else why not, in a few words."""
    if not isinstance(model, GPT):
        return f"the model is a {type(model).__name__}, not model.GPT"
    config = model.config
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in KNOWN_FIELDS and value != field.default:
            return f"model option {field.name}={value!r} is not implemented by the fast path"
    activation = getattr(config, "activation", "gelu")
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not implemented by the fast path"
    if next(model.parameters()).device.type != "cpu":
        return "the fast path is for CPUs; GPUs keep their own"
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


def norm_of(module: nn.Module):
    """The functional form of a LayerNorm or parameter-free RMSNorm module: x -> normed x."""
    if isinstance(module, nn.RMSNorm):
        return lambda x: F.rms_norm(x, module.normalized_shape, module.weight, module.eps)
    return lambda x: F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 and one float scale per output row (weight-only
    quantization, symmetric, per output channel): W ~= int8 * scale. The matrix product runs
    in bf16 activations: torch._weight_int8pack_mm is slow with float32 ones."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
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
    """'float32' or 'int8' for the block matrices, whichever runs one block's four products
    faster here at this batch size (interleaved timings, a few ms in all), and why. Measured,
    not assumed from CPU flags: on our AVX2 EPYC, int8 measured about as fast as float32 on one
    thread and up to 100x slower on two threads of a loaded host."""
    if not int8_available():
        return "float32", "int8 weight-only kernel not available in this torch build"
    float_linears = _block_linears(model.transformer.h[0])
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
    figures = f"{i8 * 1e3:.3f} ms int8 vs {f32 * 1e3:.3f} ms float32 per block at batch {batch_size}"
    # int8 changes the numbers a little, so it must win by 10%, in the typical run (median)
    # and in the best one (min, which other processes' load cannot inflate). On the quiet AVX2
    # EPYC a 19% win per block made whole decode steps 37% faster (166 vs 122 tokens/s)
    if i8 < 0.9 * f32 and min(times["int8"]) < 0.9 * min(times["float32"]):
        return "int8", f"int8 weights ({figures}, measured on this CPU)"
    return "float32", f"float32 weights (int8 is not faster on this CPU: {figures})"


class StaticKVCache:
    """Keys and values of every layer for one generation: one buffer per layer, allocated once
    at the full window, (B, nh, block_size, hs), written in place, and the last token seen (the
    bigram option's previous token). One per generate_stream call, so generations running at
    the same time (a web demo) never share one."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_size: int):
        shape = (batch_size, n_head, block_size, head_size)
        self.k = [torch.zeros(shape) for _ in range(n_layer)]
        self.v = [torch.zeros(shape) for _ in range(n_layer)]
        self.last_token = torch.zeros(batch_size, dtype=torch.long)  # (B,): the last token seen


class FastDecoder:
    """The model's forward for decoding, over a static KV cache, with every option model.py
    has (norm, rotary, qk_norm, activation, untied head, bigram). Holds no copy of float32
    weights; with weights="int8", the block matrices are swapped for Int8Linear copies."""

    def __init__(self, model: GPT, weights: str = "float32"):
        assert weights in ("float32", "int8"), weights
        why = supported(model)
        assert why is None, why
        self.model = model
        self.weights = weights
        config = model.config
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.act = ACTIVATIONS[getattr(config, "activation", "gelu")]
        self.qk_norm = getattr(config, "qk_norm", False)
        self.rotary = model.rotary if getattr(config, "rotary", False) else None
        self.bigram = model.bigram.weight if getattr(config, "bigram", False) else None
        make = Int8Linear if weights == "int8" else (lambda lin: lin)
        self.linears = [[make(lin) for lin in _block_linears(b)] for b in model.transformer.h]
        self.norms = [(norm_of(b.ln_1), norm_of(b.ln_2)) for b in model.transformer.h]
        self.ln_f = norm_of(model.transformer.ln_f)
        self.compiled_step = None  # compile_step() sets it
        # prompts and refills after a slide (many tokens at once) run on the float32 weights:
        # matrix-matrix products, where float32 is fast and int8's kernel is not (128 tokens of
        # the 6x384 model: 56 ms against 95), and exact; the cache they fill is the same
        self.prefill = self if weights == "float32" else FastDecoder(model, "float32")

    def compile_step(self, batch_size: int = 1) -> float:
        """torch.compile the one-token step (whole graph, the position and batch size symbolic:
        one graph serves every position from 2 on) and run it once, which compiles it: seconds
        taken. For long generations and sessions: eager steps start at once, and the compiled
        step runs the ~200 small ops around the matrix products as a few fused C++ loops.

        Inductor keeps what it builds in an on-disk cache, TORCHINDUCTOR_CACHE_DIR (here
        ~/.cache/torchinductor unless the environment names one), keyed by the graph (the
        model's shape, options and weight format), the torch version and the CPU's instruction
        set, so a later process compiles from it. The weights are inputs of the graph, not
        constants in it: another checkpoint of the same shape reuses the entries and computes
        with its own weights. Inductor writes each entry to a temporary file and renames it, so
        a process killed while compiling leaves no half-written entry behind."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torchinductor"))
        if self.block_size < 4:  # no position the compiled step would serve (see step)
            return 0.0
        t0 = time.perf_counter()
        step = torch.compile(self._step, fullgraph=True, dynamic=True)
        cache = self.new_cache(batch_size)
        with torch.no_grad():
            step(torch.zeros(batch_size, dtype=torch.long), 2, cache)
        self.compiled_step = step
        return time.perf_counter() - t0

    def mlp(self, h: torch.Tensor, c_fc, mlp_proj) -> torch.Tensor:
        """A block's MLP on normed h. With int8 weights the hidden layer stays bf16, the input
        mlp_proj's kernel takes."""
        if self.weights == "int8":
            return mlp_proj(self.act(c_fc(h, torch.bfloat16)))
        return mlp_proj(self.act(c_fc(h)))

    def new_cache(self, batch_size: int) -> StaticKVCache:
        return StaticKVCache(len(self.linears), batch_size, self.n_head, self.block_size, self.head_size)

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, pos: int, cache: StaticKVCache | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """idx (B, T): tokens at positions [pos, pos + T) of a window whose positions [0, pos)
        are in cache (None: a new cache, pos must be 0). Returns the logits of the last
        position (B, vocab), or of every position (B, T, vocab)."""
        B, T = idx.shape
        end = pos + T
        assert end <= self.block_size, f"positions up to {end} past block_size {self.block_size}"
        if cache is None:
            assert pos == 0, "a window that does not start at 0 needs the cache of its start"
            cache = self.new_cache(B)
        tr = self.model.transformer
        nh, hs = self.n_head, self.head_size
        C = nh * hs
        x = tr.wte(idx)  # (B, T, C)
        if self.rotary is None:
            x = x + tr.wpe.weight[pos:end]
        else:
            rope = self.rotary.cos[pos:end], self.rotary.sin[pos:end]  # (T, hs/2) each
        if self.bigram is not None:  # rows previous * vocab + token; a window's first token has none
            V = self.vocab_size
            first = cache.last_token[:, None] if pos > 0 else idx.new_full((B, 1), V)
            x = x + F.embedding(torch.cat([first, idx[:, :-1]], dim=1) * V + idx, self.bigram)
        for (c_attn, attn_proj, c_fc, mlp_proj), (ln_1, ln_2), k_buf, v_buf in zip(
                self.linears, self.norms, cache.k, cache.v):
            qkv = c_attn(ln_1(x)).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
            q, k = qkv[0], qkv[1]
            if self.qk_norm:
                q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
            if self.rotary is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            k_buf[:, :, pos:end] = k
            v_buf[:, :, pos:end] = qkv[2]
            keys, values = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, nh, end, hs)
            if T == 1:  # one query sees every cached position: no mask
                att = (q @ keys.transpose(-1, -2)) * (1.0 / math.sqrt(hs))
                y = att.softmax(dim=-1) @ values  # (B, nh, 1, hs)
            else:  # query t at position pos + t sees keys up to it
                mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + attn_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + self.mlp(ln_2(x), c_fc, mlp_proj)
        cache.last_token = idx[:, -1].clone(memory_format=torch.contiguous_format)  # plain strides, as step's
        if not all_logits:
            x = x[:, -1]
        return F.linear(self.ln_f(x), self.model.lm_head.weight)  # the output head stays float32

    @torch.no_grad()
    def step(self, idx: torch.Tensor, pos: int, cache: StaticKVCache) -> torch.Tensor:
        """forward for one token per row, the decoding step: idx (B,) at position pos, after
        positions [0, pos) in cache -> logits (B, vocab). The same arithmetic as forward with
        T = 1, in fewer ops: rows stay (B, C), the key and value go straight to their slot, and
        attention is SDPA over the filled slots. Compiled after compile_step(), except at
        positions 0 and 1 and the window's last slot, which torch.compile would specialize
        (compile again) for: those few steps run eager."""
        if self.compiled_step is not None and 2 <= pos < self.block_size - 1:
            # the graph's guards check strides: give it plain ones
            return self.compiled_step(idx.clone(memory_format=torch.contiguous_format), pos, cache)
        return self._step(idx, pos, cache)

    def _step(self, idx: torch.Tensor, pos: int, cache: StaticKVCache) -> torch.Tensor:
        B = idx.size(0)
        tr = self.model.transformer
        nh, hs = self.n_head, self.head_size
        C = nh * hs
        x = F.embedding(idx, tr.wte.weight)  # (B, C); positions are sliced, not indexed, so
        if self.rotary is None:  # a compiled step keeps pos symbolic
            x = x + tr.wpe.weight[pos:pos + 1]
        else:
            rope = self.rotary.cos[pos:pos + 1], self.rotary.sin[pos:pos + 1]  # (1, hs/2) each
        if self.bigram is not None:  # a window's first token has no previous one
            previous = cache.last_token if pos > 0 else torch.full_like(idx, self.vocab_size)
            x = x + F.embedding(previous * self.vocab_size + idx, self.bigram)
        for (c_attn, attn_proj, c_fc, mlp_proj), (ln_1, ln_2), k_buf, v_buf in zip(
                self.linears, self.norms, cache.k, cache.v):
            q, k, v = c_attn(ln_1(x)).view(B, 3, nh, 1, hs).unbind(1)  # (B, nh, 1, hs) each
            if self.qk_norm:
                q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
            if self.rotary is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            k_buf[:, :, pos:pos + 1] = k
            v_buf[:, :, pos:pos + 1] = v
            y = F.scaled_dot_product_attention(q, k_buf[:, :, :pos + 1], v_buf[:, :, :pos + 1])  # (B, nh, 1, hs)
            x = x + attn_proj(y.view(B, C))
            x = x + self.mlp(ln_2(x), c_fc, mlp_proj)
        cache.last_token = idx
        return F.linear(self.ln_f(x), self.model.lm_head.weight)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        generator=None, use_cache=True, min_p=0.0, repetition_penalty=1.0):
        """GPT.generate_stream's contract on this decoder: yields the next token ids (B,), and
        slides the same way past block_size (the window jumps to keep its last block_size // 2
        tokens, which are then re-read). use_cache=False is the model's own no-cache loop."""
        if not use_cache:
            yield from self.model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                                  generator, use_cache=False, min_p=min_p,
                                                  repetition_penalty=repetition_penalty)
            return
        block_size = self.block_size
        B, T = idx.shape
        cache = self.new_cache(B)
        tokens = idx.new_empty(B, T + max_new_tokens)  # every token so far, written in place
        tokens[:, :T] = idx
        n = T  # tokens filled
        start = max(0, n - block_size)  # first token of the current window
        cached = 0  # tokens of the window in the cache
        for _ in range(max_new_tokens):
            if n - start > block_size:
                start, cached = n - block_size // 2, 0
            if n - start - cached == 1:  # one new token: the decoding step
                logits = self.step(tokens[:, n - 1], cached, cache)
            else:  # the prompt, or a window refilled after a slide
                logits = self.prefill.forward(tokens[:, start + cached:n], cached, cache)
            cached = n - start
            next_id = sample_next(logits, temperature, top_k, top_p, generator, min_p,
                                  repetition_penalty, tokens[:, :n])  # (B,)
            tokens[:, n] = next_id
            n += 1
            yield next_id

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + max_new_tokens), as GPT.generate."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


@torch.no_grad()
def matches_model(decoder: FastDecoder, tokens: int = 8, tolerance: float = 1e-3) -> bool:
    """Whether the decoder's step in float32 gives the model's own logits on a few tokens (a
    prompt, then one more token): the guard against a model this file would compute wrongly."""
    model = decoder.model
    reference = FastDecoder(model, "float32") if decoder.weights != "float32" else decoder
    T = min(tokens, model.config.block_size)
    idx = torch.arange(T).remainder(model.config.vocab_size)[None]  # (1, T)
    expected = model(idx)[0][:, -1]  # (1, vocab): the last position
    cache = reference.new_cache(1)
    if T > 1:
        reference.forward(idx[:, :-1], 0, cache)  # the first T - 1 positions into the cache
    got = reference.step(idx[:, -1], T - 1, cache)  # the step generation runs on
    return (got - expected).abs().max().item() <= tolerance * (expected.abs().max().item() + 1.0)


def decoder_for(model: nn.Module, batch_size: int, weights: str = "auto"):
    """What to call generate_stream on: a FastDecoder where it applies, else the model itself.
    weights: auto (choose_weights), float32 or int8. Returns (decoder, why, in a few words)."""
    why = supported(model)
    if why is not None:
        return model, f"plain ({why})"
    if weights == "auto":
        weights, reason = choose_weights(model, batch_size)
    else:
        reason = f"{weights} weights (as requested)"
    decoder = FastDecoder(model, weights)
    if not matches_model(decoder):
        return model, "plain (the fast path's logits differ from this model's own)"
    return decoder, f"fast CPU path, static KV cache, {reason}"


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
