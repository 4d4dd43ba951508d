"""The GPT: GPT-2's architecture, a KV cache, and generation.

Module names follow GPT-2 (transformer.wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f, lm_head) so GPT-2 weights map by name. The "build GPT from
scratch" lecture's pieces are here under nanoGPT's names: its Head and MultiHeadAttention are
CausalSelfAttention (all heads from one c_attn matrix), FeedForward is MLP, sa/ffwd are attn/mlp
of a Block, and the tril mask is scaled_dot_product_attention's is_causal=True (in
cpu_kernels.causal_attention, which also runs the CPU's faster C kernels). References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT's model.py, which this file follows closely.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from cpu_kernels import Dropout, causal_attention, gelu, relu_squared, residual_dropout
from cpu_kernels import qk_heads as cpu_qk_heads, rms_norm as cpu_rms_norm, rotary as cpu_rotary
from optim import Muon, MuonAdamW, newton_schulz_dtype


@dataclass
class ModelOptions:
    """A GPT's shape and architecture as a user chooses them, declared once: GPTConfig adds the
    vocabulary (which the data decides), and train.py's settings (training.TrainConfig) inherit
    these, so each is a flag with this default and, in --help, this comment."""
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # embedding width
    block_size: int = 1024  # context length in tokens: the longest the model sees
    dropout: float = 0.0  # dropout probability in training; 0 for pretraining, 0.1+ for finetuning
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them)
    # options beyond GPT-2 (modded-nanogpt, nanochat); each default is GPT-2's behaviour
    activation: str = "gelu"  # gelu (exact, nanoGPT), gelu_tanh (GPT-2's), relu2 (modded-nanogpt)
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (parameter-free RMSNorm, modded-nanogpt)
    rotary: bool = False  # rotary position embeddings on q and k instead of the learned wpe table
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before attention
    tie_head: bool = True  # output head shares the token embedding (GPT-2); false: its own, zero-init
    zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj start at zero (each block starts as identity)
    bigram: bool = False  # add a learned vector per (previous token, token) pair to the input (char vocabularies)
    x0_lambdas: bool = False  # each block's input is a learned mix of the residual stream and the first input
    value_embeds: bool = False  # a token embedding table per block, added to attention's values

    def non_gpt2_options(self) -> list[str]:
        """The options in use that GPT-2's architecture lacks, as "name=value" (empty for a
        GPT-2 model). Code that only knows GPT-2 (a plain GPT-2 Hugging Face folder, a fixed
        decode path) refuses a model whose list is not empty, or hands it over to a general
        path. Every field after GPT2_SHAPE counts, unless its value is in GPT2_EQUIVALENT: so
        an option added later is refused by that code until someone says otherwise."""
        beyond = [f for f in dataclasses.fields(ModelOptions) if f.name not in GPT2_SHAPE]
        return [f"{f.name}={getattr(self, f.name)}" for f in beyond
                if getattr(self, f.name) not in (f.default, *GPT2_EQUIVALENT.get(f.name, ()))]

    def problems(self) -> list[str]:
        """Every setting the model cannot be built with, named as its flag (--key), so that
        train.py reports them with its own and a model built in code raises them."""
        p = [f"--{k} must be at least 1, got {getattr(self, k)}"
             for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k) < 1]
        if not 0 <= self.dropout < 1:  # also false for nan
            p.append(f"--dropout must be in [0, 1), got {self.dropout}")
        divisible = self.n_head >= 1 and self.n_embd % self.n_head == 0
        if self.n_layer >= 1 and self.n_head >= 1 and not divisible:
            p.append(f"--n_embd ({self.n_embd}) must be divisible by --n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS:
            p.append(f"--activation must be {_one_of(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm not in NORMS:
            p.append(f"--norm must be {_one_of(NORMS)}, got {self.norm!r}")
        if self.rotary and divisible and (self.n_embd // self.n_head) % 2:
            p.append(f"--rotary needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}; "
                     f"change --n_embd or --n_head")
        return p


# ModelOptions' fields that GPT-2 has; the fields after them are the options beyond it
GPT2_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
# values of an option beyond GPT-2 that still compute GPT-2's architecture: gelu_tanh is GPT-2's
# own activation, and zero_init_proj changes only the initialization
GPT2_EQUIVALENT = {"activation": ("gelu_tanh",), "zero_init_proj": (True,)}
# the options fixed once a model exists (a resumed or finetuned run keeps them); dropout may change
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelOptions) if f.name != "dropout")


def _one_of(choices) -> str:
    """"a, b or c" of the choices' names."""
    names = list(choices)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class GPTConfig(ModelOptions):
    """A model's whole configuration: its options, and the vocabulary its data brings."""
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64

    def problems(self) -> list[str]:
        p = super().problems()
        if self.vocab_size < 1:
            p.append(f"vocab_size must be at least 1, got {self.vocab_size}")
        if self.bigram and self.vocab_size > BIGRAM_MAX_VOCAB:
            p.append(f"--bigram needs a vocabulary of at most {BIGRAM_MAX_VOCAB} tokens (its table has "
                     f"vocab_size^2 rows), got {self.vocab_size}; use it with char-level data, or pass --bigram=False "
                     f"(a CPU recipe turns it on)")
        return p


class ReLUSquared(nn.Module):
    """relu(x)^2: the MLP activation of Primer (So et al. 2021) and modded-nanogpt."""

    def forward(self, x):
        return relu_squared(x)  # F.relu(x).square(), in one pass on a CPU (cpu_kernels.py)


class GELU(nn.GELU):
    """nn.GELU, its backward in bf16 on a CPU by table lookups (cpu_kernels.gelu): the same values."""

    def forward(self, x):
        return gelu(x, self.approximate)


# the MLP's activation by GPTConfig.activation
ACTIVATIONS = {"gelu": GELU, "gelu_tanh": lambda: GELU(approximate="tanh"), "relu2": ReLUSquared}
NORMS = ("layernorm", "rmsnorm")  # GPTConfig.norm's choices (make_norm)
BIGRAM_MAX_VOCAB = 1024  # the bigram table holds (vocab_size + 1) * vocab_size vectors


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm without parameters (elementwise_affine=False), by cpu_kernels.rms_norm: when
    training on a CPU, the same values in fewer passes."""

    def forward(self, x):
        return cpu_rms_norm(x, self.normalized_shape, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, elementwise_affine=False)  # no parameters at all
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer, Su et al. 2021): each pair of channels of q and k is
    rotated by an angle proportional to the token's position, so q . k depends only on the
    distance between the two tokens. Positions come in as a tensor, (T,) or (B, T), so any
    position can be asked for (the KV cache asks for the next ones)."""

    def __init__(self, head_size: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)  # (hs/2,)
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (max_positions, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)  # derived: not in the checkpoint
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # each (T, hs/2) or (B, T, hs/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) with each channel pair (i, i + hs/2) rotated by its angle."""
    if cos.dim() == 3:  # per-sequence positions (B, T, hs/2) -> (B, 1, T, hs/2)
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if (rotated := cpu_rotary(x, cos, sin)) is not None:  # the same, in one pass on a CPU
        return rotated
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs
    one position's work instead of a forward pass over the whole context.

    Each layer's buffer (B, nh, max_length, hs) is allocated once, on the first update, and
    written in place: appending a token copies one position, where torch.cat would copy
    the whole history every step.
    """

    def __init__(self, n_layer: int, max_length: int, zeros: bool = False):
        self.max_length = max_length  # positions the buffers hold (the model's block_size)
        # zeros: buffers start as zeros, not whatever memory held: a CUDA graph's step
        # (fast_decode.GraphDecoder) reads the positions not yet written too (masked), and 0 * nan
        # would be nan. Others leave them unwritten: a large model's pages are then touched only
        # as the context grows
        self.zeros = zeros
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, max_length, hs)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions filled; GPT.forward advances it after all layers ran
        self.last_token: torch.Tensor | None = None  # (B,) the last token seen, for the bigram option

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v (B, nh, T_new, hs) of one layer after the filled positions;
        return views of everything so far, (B, nh, length + T_new, hs)."""
        B, nh, T, hs = k.shape
        end = self.length + T
        assert end <= self.max_length, f"KV cache holds {self.max_length} positions, asked for {end}"
        buf = self.k[layer]
        if buf is None or buf.shape[0] != B or buf.dtype != k.dtype or buf.device != k.device:
            assert self.length == 0, "KV cache reused with another batch size, dtype or device"
            new = k.new_zeros if self.zeros else k.new_empty
            self.k[layer] = new(B, nh, self.max_length, hs)
            self.v[layer] = new(B, nh, self.max_length, hs)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, idx: torch.Tensor):
        """Count the tokens idx (B, T) as cached, once every layer has its keys and values."""
        self.length += idx.size(1)
        self.last_token = idx[:, -1]

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
        self.qk_norm = config.qk_norm
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                mask: torch.Tensor | None = None, rope=None, ve=None) -> torch.Tensor:
        """mask: None (causal) or document_mask (B, 1, T, T), for rows of several documents.
        rope: (cos, sin) of the rotary option at these tokens' positions, or None.
        ve: (B, T, C) the value_embeds option's vectors of these tokens, added to the values."""
        B, T, C = x.size()  # batch, sequence length, embedding width
        qkv = self.c_attn(x)
        # training on a CPU, the lines below in one C pass each way (the same values: cpu_kernels.py)
        heads = cpu_qk_heads(qkv, self.n_head, *rope) if self.qk_norm and rope is not None and ve is None else None
        if heads is not None:
            q, k, v = heads
        else:
            q, k, v = qkv.split(self.n_embd, dim=2)
            if ve is not None:
                v = v + ve
            hs = C // self.n_head
            q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
            if self.qk_norm:
                q, k = cpu_rms_norm(q, (hs,)), cpu_rms_norm(k, (hs,))  # F.rms_norm (cpu_kernels.py)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
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
        return self.c_proj(y)  # resid_dropout: Block applies it with the residual add


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()  # see GPTConfig.activation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))  # dropout: Block applies it with the residual add


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        if config.x0_lambdas:  # modded-nanogpt: starts as the plain residual stream (1, 0)
            self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, kv_cache=None, mask=None, rope=None, x0=None, ve=None):
        if x0 is not None:  # the x0_lambdas option: x0 is the first block's input
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        # x + dropout(sublayer output), in one pass on a CPU (cpu_kernels.residual_dropout)
        x = residual_dropout(x, self.attn(self.ln_1(x), kv_cache, mask, rope, ve), self.attn.resid_dropout)
        x = residual_dropout(x, self.mlp(self.ln_2(x)), self.mlp.dropout)
        return x


class GPT(nn.Module):
    grad_checkpoint = False  # train.py --grad_checkpoint: recompute each block's activations in backward

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.problems():
            raise ValueError("; ".join(config.problems()))
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.rotary:
            self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        else:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.bigram:
            # row prev * vocab + token; prev = vocab_size marks "no previous token" (window start)
            self.bigram = nn.Embedding((config.vocab_size + 1) * config.vocab_size, config.n_embd)
        if config.value_embeds:  # modded-nanogpt's value embeddings, one table per block
            self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd)
                                              for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            # weight tying: https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init_proj:
                    torch.nn.init.zeros_(p)
        # zero-init options (modded-nanogpt): the untied head, and the bigram table, which then
        # starts as a no-op and learns only what the pairs add
        if not config.tie_head:
            torch.nn.init.zeros_(self.lm_head.weight)
        if config.bigram:
            torch.nn.init.zeros_(self.bigram.weight)
        for table in self.value_embeds if config.value_embeds else []:  # likewise: attention as GPT-2's at first
            torch.nn.init.zeros_(table.weight)

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state: dict) -> "GPT":
        """GPT(config) with state loaded (load_state_dict's checks and errors), built without
        first drawing the random weights that state replaces: a loaded model starts sooner
        (docs/speed.md). torch.nn.init's random fills do nothing meanwhile, as transformers'
        no_init_weights does; building on the meta device instead imports torch's compiler
        (its init functions run as Python references there), which costs a second."""
        fills = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
        saved = {name: getattr(torch.nn.init, name) for name in fills}
        try:
            for name in fills:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            model = cls(config)
        finally:
            for name, fill in saved.items():
                setattr(torch.nn.init, name, fill)
        model.load_state_dict(state)
        return model

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; position embeddings are left out by default, as in nanoGPT, and so are
        the other lookup-only tables: the token embeddings count only when they are tied to the
        output head (tie_head, GPT-2's way; the CPU recipes untie them)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # also leave out the lookup-only tables of the options
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n -= self.bigram.weight.numel() if self.config.bigram else 0
            n -= sum(t.weight.numel() for t in self.value_embeds) if self.config.value_embeds else 0
            n -= self.transformer.wte.weight.numel() if not self.config.tie_head else 0
        return n

    def crop_block_size(self, block_size: int):
        """Keep the first block_size position embeddings, e.g. to finetune GPT-2 (1024
        positions) with a shorter context, as nanoGPT does. A rotary model has no table to crop."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
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
        x = self.transformer.wte(idx)  # (B, T, C)
        mask = None
        if positions is None:  # one sequence per row: positions start.., causal attention
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:  # rows of several documents: positions restart at each, attention stays inside
            assert kv_cache is None, "positions are for training rows, not cached generation"
            mask = document_mask(positions)  # (B, 1, T, T), built once for all layers
        rope = None
        if self.config.rotary:
            rope = self.rotary(positions)  # (T, hs/2) or (B, T, hs/2) each
        elif positions.dim() == 1:
            x = x + self.transformer.wpe.weight[start:start + T]  # (T, C): a view, no lookup
        else:
            x = x + self.transformer.wpe(positions)  # (B, T, C)
        if self.config.bigram:
            x = x + self.bigram(self.bigram_ids(idx, kv_cache))
        x = self.transformer.drop(x)
        x0 = x if self.config.x0_lambdas else None
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[i](idx) if self.config.value_embeds else None
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():  # never when decoding
                x = torch.utils.checkpoint.checkpoint(block, x, kv_cache, mask, rope, x0, ve, use_reentrant=False)
            else:
                x = block(x, kv_cache, mask, rope, x0, ve)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(idx)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # a slice keeps the time dim
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def bigram_ids(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Rows of the bigram table for idx (B, T): previous token * vocab + token. The first
        token of a window has no previous one (marked vocab_size), as in training, where each
        window starts fresh; with the cache, the previous token is the last one it saw."""
        V = self.config.vocab_size
        first = idx.new_full((idx.size(0), 1), V)  # (B, 1)
        if kv_cache is not None and kv_cache.length > 0:
            first = kv_cache.last_token[:, None]
        return torch.cat([first, idx[:, :-1]], dim=1) * V + idx  # (B, T)

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type, name="adamw",
                            head_lr_scale=1.0, embed_lr_scale=1.0):
        """AdamW, with weight decay on 2-D weights (matmuls, embeddings) only, not biases or norms.

        name="muon": torch.optim.Muon for the 2-D weights inside the blocks, AdamW for the rest
        (see MuonAdamW). Both take learning_rate and weight_decay: Muon scales its update to
        AdamW's size (adjust_lr_fn="match_rms_adamw"), so one schedule drives both.
        An untied head gets a group of its own with "lr_scale": head_lr_scale, which the
        training loop multiplies into the scheduled learning rate; so do the embedding tables
        (wte, wpe, bigram, value_embeds) with embed_lr_scale, when it is not 1 (a group of their own only then,
        so the optimizer state of a run without it keeps its layout)."""
        if name not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {name!r}")
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        is_hidden = [name == "muon" and n.startswith("transformer.h.") and p.dim() == 2 for n, p in params]
        hidden = [p for (_, p), h in zip(params, is_hidden) if h]
        rest = [p for (_, p), h in zip(params, is_hidden) if not h]
        head = [] if self.config.tie_head else [self.lm_head.weight]
        # a tied wte is the head too: it follows embed_lr_scale
        tables = [m.weight for m in self.modules() if isinstance(m, nn.Embedding)] if embed_lr_scale != 1 else []
        rest = [p for p in rest if all(p is not h for h in head + tables)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
                  {"params": tables, "weight_decay": weight_decay, "lr_scale": embed_lr_scale},
                  {"params": head, "weight_decay": weight_decay, "lr_scale": head_lr_scale}]
        groups = [g for g in groups if g["params"]]  # rmsnorm without biases leaves no 1-D parameters
        # the fused kernel updates every parameter in one pass, on cpu and cuda alike
        fused = device_type in ("cuda", "cpu")
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        if name == "adamw":
            return adamw
        muon = Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                    ns_dtype=newton_schulz_dtype(device_type))
        return MuonAdamW(muon, adamw)

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        generator=None, use_cache=True, min_p=0.0, repetition_penalty=1.0):
        """Yield the next token ids (B,) one step at a time, continuing idx (B, T): the model's
        forward in slide_window's loop (see there for the window past block_size). Without the
        cache, the same window is recomputed every step, so greedy output with and without the
        cache is the same."""
        cache = KVCache(self.config.n_layer, self.config.block_size) if use_cache else None

        def next_logits(new_tokens, cache):  # (B, T) -> the last position's logits (B, vocab)
            return self(new_tokens, kv_cache=cache)[0][:, -1]

        yield from slide_window(next_logits, self.config.block_size, cache, idx, max_new_tokens,
                                temperature, top_k, top_p, generator, min_p, repetition_penalty)

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + max_new_tokens): the prompt and its continuation."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


def slide_window(next_logits, block_size: int, cache: KVCache | None, idx: torch.Tensor,
                 max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, generator=None,
                 min_p=0.0, repetition_penalty=1.0):
    """The generation loop every decoder shares: yield the next token ids (B,) one step at a
    time, continuing idx (B, T). next_logits(tokens (B, T_new), cache) -> logits (B, vocab) of
    the last of tokens, which are the window's tokens not yet in cache (all of them when cache
    is None).

    Context past block_size slides: when the tokens since the window start no longer fit in
    block_size, the window jumps forward to keep the last block_size // 2 tokens (a block of
    one keeps its one) and the cache is refilled from them. So the model always sees between block_size // 2 and block_size
    tokens of context, and each refill is paid once per block_size // 2 new tokens. A prompt
    longer than block_size starts from its last block_size tokens."""
    B, T = idx.shape
    # every token so far, written in place (B, T + max_new_tokens): no torch.cat per step
    tokens = idx.new_empty(B, T + max_new_tokens)
    tokens[:, :T] = idx
    n = T  # tokens filled
    start = max(0, n - block_size)  # first token of the current window
    for _ in range(max_new_tokens):
        if n - start > block_size:
            start = n - max(1, block_size // 2)  # a block of one keeps its one token
            if cache is not None:
                cache.reset()
        cached = cache.length if cache is not None else 0
        next_id = sample_next(next_logits(tokens[:, start + cached:n], cache), temperature, top_k, top_p,
                              generator, min_p, repetition_penalty, tokens[:, :n])  # (B,)
        tokens[:, n] = next_id
        n += 1
        yield next_id


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, min_p=0.0,
                repetition_penalty=1.0, seen=None):
    """Pick the next token from logits (B, vocab). temperature 0 is greedy; top_k keeps the k
    most likely (clamped to the vocabulary, None or 0 = off); top_p keeps the smallest set
    whose probability reaches p (nucleus sampling, Holtzman et al. 2019; 1.0 = off); min_p
    keeps the tokens at least min_p times as likely as the best one, after temperature (Nguyen
    et al. 2024, "min-p sampling"; 0 = off). repetition_penalty divides the positive logits
    and multiplies the negative ones of every token in seen (B, n), the tokens so far, before
    anything else (CTRL, Keskar et al. 2019, as Hugging Face's; 1.0 = off, above 1 repeats less)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        logits = logits.scatter(1, seen, picked)
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
    if min_p > 0:  # logits hold log-probabilities up to a shift: compare with the best one's
        logits = logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True) + math.log(min_p), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
