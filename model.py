"""The GPT: GPT-2's architecture, a KV cache, and generation.

Module names follow GPT-2 (transformer.wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f, lm_head) so GPT-2 weights map by name. References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT's model.py, which this file follows closely.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees (learned position embeddings)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # embedding width
    dropout: float = 0.0  # dropout probability in training
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs
    one position's work instead of a forward pass over the whole context.

    Each layer's buffer (B, nh, max_length, hs) is allocated once, on the first update, and
    written in place: appending a token copies one position, where torch.cat would copy
    the whole history every step.
    """

    def __init__(self, n_layer: int, max_length: int):
        self.max_length = max_length  # positions the buffers hold (the model's block_size)
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, max_length, hs)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions filled; GPT.forward advances it after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v (B, nh, T_new, hs) of one layer after the filled positions;
        return views of everything so far, (B, nh, length + T_new, hs)."""
        B, nh, T, hs = k.shape
        end = self.length + T
        assert end <= self.max_length, f"KV cache holds {self.max_length} positions, asked for {end}"
        buf = self.k[layer]
        if buf is None or buf.shape[0] != B or buf.dtype != k.dtype or buf.device != k.device:
            assert self.length == 0, "KV cache reused with another batch size, dtype or device"
            self.k[layer] = k.new_empty(B, nh, self.max_length, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_length, hs)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self):
        """Forget every position but keep the buffers, to refill them with a new window."""
        self.length = 0


# ---------------------------------------------------------------------------- dropout on CPU
# torch's CPU dropout draws its mask with bernoulli_ (about 10 ns an element), and SDPA with
# dropout_p > 0 leaves the fused flash kernel for an unfused math path over full-size
# temporaries: at the Shakespeare shape that made a bf16 training step about 3x slower at
# dropout 0.2 than at 0. The code below draws the same masks (each element dropped
# independently with probability p, survivors scaled by 1/(1-p)) from cheap random bits, and
# computes attention dropout in cache-sized chunks.
# The bits come from numpy's SFC64 generator seeded from torch's global RNG, so
# torch.manual_seed and torch.set_rng_state still determine every mask (exact resume holds).
# Only used on CPU in eager mode: GPUs and torch.compile keep torch's own dropout.

def use_cpu_dropout(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _random_int16(n: int) -> np.ndarray:
    """n uniform int16 values from numpy's SFC64 (about 10x faster than torch's bernoulli_ on
    CPU), seeded with one draw from torch's global RNG."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)  # uint64, four int16 each
    return words.view(np.int16)[:n]


def _drop_threshold(p: float) -> tuple[int, float]:
    """16 random bits per element: an int16 below the threshold is dropped, so P(drop) =
    round(p * 2**16) / 2**16, within 8e-6 of p; the survivors' scale 1 / (1 - that) keeps the
    expectation exact."""
    drop_count = round(p * 65536)
    return drop_count - 32768, 65536 / (65536 - drop_count)


_BITS = {2: (np.uint16, torch.int16), 4: (np.uint32, torch.int32), 8: (np.uint64, torch.int64)}  # by item size


def _ones_where_kept(drop: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of dtype: 1 where `drop` (a numpy bool array) is False, 0 where True. Made as
    the bit pattern of 1.0 times the kept bytes, in numpy: multiplying by this mask is about
    10x faster on CPU than torch.where with a bool mask (41 ms against 3 ms for a 64x256x384
    bf16 tensor), and gives the same values."""
    uint, same_size_int = _BITS[torch.empty((), dtype=dtype).element_size()]
    one = torch.ones((), dtype=dtype).view(same_size_int).item()  # the bits of 1.0 (positive)
    ones = np.multiply(np.logical_not(drop), uint(one), dtype=uint)
    return torch.from_numpy(ones).view(dtype)


def _dropped_numpy(shape, p: float) -> tuple[np.ndarray, float]:
    """A numpy bool array of `shape`, True where an element is dropped, and the survivors' scale."""
    threshold, scale = _drop_threshold(p)
    return np.less(_random_int16(math.prod(shape)).reshape(shape), threshold), scale


def _dropped_causal_numpy(B: int, nh: int, T: int, p: float) -> tuple[np.ndarray, float]:
    """Like _dropped_numpy((B, nh, T, T), p), but only the causal part (key <= query) is drawn:
    half the random bits. Rows i and T-1-i need i+1 and T-i draws, T+1 together, so one row of
    (T/2, T+1) draws serves both: row i reads it forwards, row T-1-i backwards from its end.
    Entries above the diagonal repeat draws from below it and must not be used."""
    if T % 2:
        return _dropped_numpy((B, nh, T, T), p)
    threshold, scale = _drop_threshold(p)
    half = T // 2
    bits = _random_int16(B * nh * half * (T + 1)).reshape(B * nh, half, T + 1)
    drop = np.empty((B, nh, T, T), dtype=np.bool_)
    out = drop.reshape(B * nh, T, T)
    np.less(bits[:, :, :T], threshold, out=out[:, :half])  # row i, columns 0..i used
    np.less(bits[:, ::-1, :0:-1], threshold, out=out[:, half:])  # row T-1-i: draws T..i+1
    return drop, scale


def _dropped_causal(B: int, nh: int, T: int, p: float) -> tuple[torch.Tensor, float]:
    """_dropped_causal_numpy as a torch bool tensor (the mask the attention below uses)."""
    drop, scale = _dropped_causal_numpy(B, nh, T, p)
    return torch.from_numpy(drop), scale


class _CPUDropout(torch.autograd.Function):
    """Dropout with a mask from _dropped_numpy, kept as 0/1 in x's dtype for the backward pass."""

    @staticmethod
    def forward(ctx, x, p):
        drop, scale = _dropped_numpy(x.shape, p)
        kept = _ones_where_kept(drop, x.dtype)
        ctx.save_for_backward(kept)
        ctx.scale = scale
        return (x * kept).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        return (grad * kept).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """nn.Dropout, with the fast mask of _CPUDropout on CPU."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x  # nothing to drop (skips a dispatch per call when decoding token by token)
        if use_cpu_dropout(x):
            return _CPUDropout.apply(x, self.p)
        return super().forward(x)


def _row_chunks(n: int, per_row: int, budget: int = 1 << 19):
    """Slices of range(n), each of about `budget` elements when a row holds per_row."""
    step = max(1, budget // per_row)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _CPUAttention(torch.autograd.Function):
    """Causal attention for training on CPU, with dropout on the attention probabilities.

    The same math as SDPA's unfused path, y = (softmax(q k^T * scale + causal) * M/(1-p)) @ v,
    computed a few sequences at a time so that the (rows, nh, T, T) temporaries stay in cache,
    with the cheap mask of _dropped_causal. On CPU this beat SDPA's math path (which dropout
    forces) and the flash kernel's backward, which is slow in bf16: ~45% of a step of a small
    model (used without dropout too, for bf16). With P the probabilities, Pm = P * M,
    c = 1/(1-p) (folded into v as vc = c v) and D_i = g_i . y_i:
        y = Pm vc,  dv = c Pm^T g,  ds = Pm * (g vc^T) - P * D,  dq = scale ds k,  dk = scale ds^T q
    P and Pm are kept for the backward pass: 2 * nh * T * T values per sequence (one without
    dropout, where Pm = P).
    """

    @staticmethod
    def forward(ctx, q, k, v, p):
        B, nh, T, hs = q.shape
        drop, keep_scale = _dropped_causal_numpy(B, nh, T, p) if p > 0 else (None, 1.0)
        kept_mask = _ones_where_kept(drop, q.dtype) if p > 0 else None  # M, 0/1
        # -inf on keys after the query; added to the scores inside the batched matmul
        causal = torch.full((T, T), float("-inf"), dtype=q.dtype).triu_(1)
        with torch.autocast("cpu", enabled=False):  # softmax stays in q's dtype
            q = (q * (1.0 / math.sqrt(hs))).contiguous()
            k, v = k.contiguous(), (v * keep_scale if p > 0 else v).contiguous()
            probs, kept, ys = [], [], []  # per chunk: P, Pm, y
            for rows in _row_chunks(B, nh * T * T):
                att = torch.baddbmm(causal, q[rows].flatten(0, 1), k[rows].flatten(0, 1).transpose(1, 2))
                probs.append(torch.softmax(att, dim=-1).view(-1, nh, T, T))
                kept.append(probs[-1] * kept_mask[rows] if p > 0 else probs[-1])
                ys.append(torch.matmul(kept[-1], v[rows]))
            y = torch.cat(ys)
        ctx.save_for_backward(q, k, v, y, *probs, *kept)
        ctx.keep_scale = keep_scale
        return y

    @staticmethod
    def backward(ctx, grad):
        q, k, v, y, *chunks = ctx.saved_tensors  # q is scaled by 1/sqrt(hs), v by keep_scale
        probs, kept = chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]
        B, nh, T, hs = q.shape
        grad = grad.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)
        minus_d = (grad.to(acc) * y.to(acc)).sum(-1, keepdim=True).neg_()  # -D, (B, nh, T, 1)
        dq, dk, dv = [], [], []
        for rows, p_chunk, pm_chunk in zip(_row_chunks(B, nh * T * T), probs, kept):
            g = grad[rows]
            dv.append(torch.matmul(pm_chunk.transpose(-1, -2), g))
            ds = torch.matmul(g, v[rows].transpose(-1, -2)).mul_(pm_chunk).addcmul_(p_chunk, minus_d[rows])
            dq.append(torch.matmul(ds, k[rows]))
            dk.append(torch.matmul(ds.transpose(-1, -2), q[rows]))
        return (torch.cat(dq).mul_(1.0 / math.sqrt(hs)), torch.cat(dk),
                torch.cat(dv).mul_(ctx.keep_scale), None)


def causal_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """Causal SDPA of q, k, v (B, nh, T, hs) with attention dropout dropout_p (0 in eval).
    Training on CPU with dropout, or in bf16, takes _CPUAttention; everything else SDPA."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if training and use_cpu_dropout(q) and (dropout_p > 0 or q.dtype == torch.bfloat16):
        return _CPUAttention.apply(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding width
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None or kv_cache.length == 0:
            if kv_cache is not None:
                kv_cache.update(self.layer, k, v)
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        else:
            # new queries at positions [past, past + T) see every cached key and the new
            # ones up to their own position
            past = kv_cache.length
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
            if T == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; position embeddings are left out by default, as in nanoGPT (the token
        embeddings count, since they are tied to the output head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy loss.

        Without targets only the last position's logits are computed (B, 1, vocab): that is
        all generation needs. With kv_cache, idx holds only the tokens not yet cached.
        """
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        pos_emb = self.transformer.wpe.weight[start:start + T]  # (T, C): positions start.., a view
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += T
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # a slice keeps the time dim
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, name="adamw"):
        """AdamW, with weight decay on 2-D weights (matmuls, embeddings) only, not biases or norms.

        name="muon": torch.optim.Muon for the 2-D weights inside the blocks, AdamW for the rest
        (see MuonAdamW). Both take learning_rate and weight_decay: Muon scales its update to
        AdamW's size (adjust_lr_fn="match_rms_adamw"), so one schedule drives both."""
        if name not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {name!r}")
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        is_hidden = [name == "muon" and n.startswith("transformer.h.") and p.dim() == 2 for n, p in params]
        hidden = [p for (_, p), h in zip(params, is_hidden) if h]
        rest = [p for (_, p), h in zip(params, is_hidden) if not h]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel updates every parameter in one pass, on cpu and cuda alike
        fused = device_type in ("cuda", "cpu")
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        if name == "adamw":
            return adamw
        muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay,
                                adjust_lr_fn="match_rms_adamw")
        return MuonAdamW(muon, adamw)

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        generator=None, use_cache=True):
        """Yield the next token ids (B,) one step at a time, continuing idx (B, T).

        Context past block_size slides: when the tokens since the window start no longer
        fit in block_size, the window jumps forward to keep the last block_size // 2 tokens
        and the cache is refilled from them. So the model always sees between block_size // 2
        and block_size tokens of context, and each refill is paid once per block_size // 2
        new tokens. A prompt longer than block_size starts from its last block_size tokens.
        Without the cache, the same window is recomputed every step, so greedy output with
        and without the cache is the same.
        """
        block_size = self.config.block_size
        B, T = idx.shape
        # every token so far, written in place (B, T + max_new_tokens): no torch.cat per step
        tokens = idx.new_empty(B, T + max_new_tokens)
        tokens[:, :T] = idx
        n = T  # tokens filled
        start = max(0, n - block_size)  # first token of the current window
        cache = KVCache(self.config.n_layer, block_size) if use_cache else None
        for _ in range(max_new_tokens):
            if n - start > block_size:
                start = n - block_size // 2
                if cache is not None:
                    cache.reset()
            if cache is not None:
                logits, _ = self(tokens[:, start + cache.length:n], kv_cache=cache)
            else:
                logits, _ = self(tokens[:, start:n])
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            tokens[:, n] = next_id
            n += 1
            yield next_id

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + max_new_tokens): the prompt and its continuation."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


class MuonAdamW:
    """Muon for the matrices inside the blocks and AdamW for the rest, stepped as one optimizer.

    Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces each
    matrix's momentum by its nearest orthogonal matrix (a few Newton-Schulz iterations), so
    every direction of the update moves at the same rate. It applies to 2-D hidden weights
    only; embeddings, the tied output head, norms and biases stay with AdamW, as in the
    reference. On the small char-level models here it reached a given loss in about half
    the steps of AdamW. The class holds both torch optimizers and shows their param_groups
    as one list, which is all train_step, the lr schedule and GradScaler use.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        # looked up each time: load_state_dict replaces the optimizers' group lists
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, vocab). temperature 0 is greedy; top_k keeps the k
    most likely (clamped to the vocabulary, None or 0 = off); top_p keeps the smallest set
    whose probability reaches p (nucleus sampling, Holtzman et al. 2019; 1.0 = off)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shift the best logit to 0 first, so a tiny temperature gives -inf, never inf - inf = nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k and top_k < logits.size(-1):  # k at or above the vocabulary keeps every token
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
