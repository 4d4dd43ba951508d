"""The GPT: GPT-2's architecture, a KV cache, and generation.

Module names follow GPT-2 (transformer.wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f, lm_head) so GPT-2 weights map by name. References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT's model.py, which this file follows closely.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from cpu_kernels import Dropout, causal_attention
from optim import MuonAdamW


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees (learned position embeddings)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # embedding width
    dropout: float = 0.0  # dropout probability in training
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    activation: str = "gelu"  # MLP nonlinearity, a key of ACTIVATIONS: gelu (exact, nanoGPT's) or gelu_tanh (GPT-2's own)


# GPTConfig.activation -> the module. GPT-2 itself used the tanh approximation of GELU (Hugging
# Face calls it "gelu_new"); imported GPT-2 weights need it to give GPT-2's logits exactly.
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


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


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """positions (B, T), each token's index in its document (0 where one starts) -> a bool
    mask (B, 1, T, T), True where query i may attend to key j: j <= i and j in i's document,
    that is i - positions[i] <= j <= i (block-diagonal causal attention)."""
    T = positions.size(1)
    i = torch.arange(T, device=positions.device)
    first = i - positions  # (B, T): where each query's document starts
    return ((i[None, None, :] <= i[None, :, None]) & (i[None, None, :] >= first[:, :, None]))[:, None]


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

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None (causal) or document_mask (B, 1, T, T), for rows of several documents."""
        B, T, C = x.size()  # batch, sequence length, embedding width
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None or kv_cache.length == 0:
            if kv_cache is not None:
                kv_cache.update(self.layer, k, v)
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0, mask)
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
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {config.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.gelu = ACTIVATIONS[config.activation]()
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

    def forward(self, x, kv_cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, mask)
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

    def crop_block_size(self, block_size: int):
        """Keep the first block_size position embeddings, e.g. to finetune GPT-2 (1024
        positions) with a shorter context, as nanoGPT does."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, positions=None):
        """idx (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy loss.

        Without targets only the last position's logits are computed (B, 1, vocab): that is
        all generation needs. With kv_cache, idx holds only the tokens not yet cached.
        positions (B, T), for rows packed with several documents (train.py's document mode):
        each token's index in its document, 0 where a document starts. Position embeddings
        then restart at each document and attention stays inside it (document_mask).
        Without it (the default, and generation) positions are 0..T-1 and attention causal.
        """
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        mask = None
        if positions is None:
            pos_emb = self.transformer.wpe.weight[start:start + T]  # (T, C): positions start.., a view
        else:
            assert kv_cache is None, "positions are for training rows, not cached generation"
            pos_emb = self.transformer.wpe(positions)  # (B, T, C)
            mask = document_mask(positions)  # (B, 1, T, T), built once for all layers
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache, mask)
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
