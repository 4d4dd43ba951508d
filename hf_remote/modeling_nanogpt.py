"""A nanogpt-toolkit GPT for Hugging Face transformers (trust_remote_code).

export.py copies this file, with configuration_nanogpt.py, into every Hugging Face folder of
a model that GPT-2's architecture cannot express, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds it with nothing of nanogpt-toolkit installed. It computes what nanogpt-toolkit's
model.py computes, option for option, with the same module names (transformer.wte,
transformer.h.N.attn.c_attn, lm_head, bigram, value_embeds, ...), so model.safetensors holds
model.py's own state dict. The KV cache is transformers' own (DynamicCache), so generate()
and its cache work as for any model of the library.

Batches of prompts of different lengths work left-padded (an attention_mask with zeros before
each prompt, as generate() takes them): each row's positions count its own tokens, its queries
never see its padding, and a bigram model reads "no previous token" before its first token.
Prompt + new tokens must fit in block_size (model.py's sample loop slides its window then,
generate() does not).
"""
import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanogpt import NanoGPTConfig

# transformers 5.24 renamed past_key_values to cache (in forward and in its outputs)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ReLUSquared(nn.Module):
    """relu(x)^2: the MLP activation of Primer (So et al. 2021) and modded-nanogpt."""

    def forward(self, x):
        return F.relu(x).square()


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu2": ReLUSquared}


def make_norm(config: NanoGPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, elementwise_affine=False)  # no parameters at all
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotary_angles(positions: torch.Tensor, head_size: int, base: float = 10000.0):
    """(cos, sin) of the rotary angles at positions (B, T), each (B, 1, T, hs/2): model.py's
    table rows, one set per row of the batch."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, device=positions.device).float() / head_size)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) with each channel pair (i, i + hs/2) rotated by its angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: NanoGPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache=None, rope=None, ve=None, keys_real=None):
        """keys_real: None, or a bool (B, cached + T) of the positions that are not padding."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        if ve is not None:
            v = v + ve
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer)
            k, v = cache.update(k, v, self.layer)  # (B, nh, past + T, hs)
        if keys_real is not None:  # padding: causal, and never a padding key (a padding query sees itself)
            at = torch.arange(T, device=x.device)
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            allowed = allowed & keys_real[:, None, :]  # (B, T, past + T)
            allowed[:, at, past + at] = True  # no row without a key (its output is never used)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # new queries see every cached key and the new ones up to their own position
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):

    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config: NanoGPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        if config.x0_lambdas:
            self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, cache=None, rope=None, x0=None, ve=None, keys_real=None):
        if x0 is not None:  # x0_lambdas: x0 is the first block's input
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(self.ln_1(x), cache, rope, ve, keys_real)
        return x + self.mlp(self.ln_2(x))


class NanoGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoGPTConfig
    base_model_prefix = "nanogpt"  # no base model inside: the weights sit at the top level
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # only when config.tie_head
    _supports_cache_class = True  # transformers 4.x: this model takes a Cache object

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        C, V = config.n_embd, config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if not config.rotary:
            self.transformer.wpe = nn.Embedding(config.block_size, C)
        if config.bigram:  # row prev * V + token; prev = V marks "no previous token"
            self.bigram = nn.Embedding((V + 1) * V, C)
        if config.value_embeds:
            self.value_embeds = nn.ModuleList(nn.Embedding(V, C) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Block) and hasattr(module, "lambdas"):
            with torch.no_grad():
                module.lambdas.copy_(torch.tensor([1.0, 0.0]))

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """generate()'s inputs, plus the token before the new ones for the bigram option: with a
        cache, input_ids holds only the new tokens, and the bigram table needs the one before."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs["input_ids"].shape[1]
        if self.config.bigram and new < input_ids.shape[1]:
            inputs["previous_token_ids"] = input_ids[:, -new - 1:-new]
        return inputs

    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None, use_cache=None,
                labels=None, previous_token_ids=None, return_dict=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab). With a cache, input_ids holds only the tokens
        not yet cached, and a bigram model needs previous_token_ids (B, 1), the token before them
        (generate() passes it)."""
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache()
        config = self.config
        B, T = input_ids.shape
        start = cache.get_seq_length() if cache is not None else 0
        real = None  # padding: a bool (B, start + T), True at the tokens that are not padding
        if attention_mask is not None and not bool(attention_mask.all()):
            if tuple(attention_mask.shape) != (B, start + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"{(B, start + T)}: the cached tokens and input_ids")
            real = attention_mask.bool()
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T): each row's own count
        else:
            positions = torch.arange(start, start + T, device=input_ids.device)[None]  # (1, T)
        if int(positions.max()) >= config.block_size:
            raise ValueError(f"sequence of length {int(positions.max()) + 1} exceeds block_size {config.block_size}")
        x = self.transformer.wte(input_ids)  # (B, T, C)
        rope = None
        if config.rotary:
            rope = rotary_angles(positions, config.n_embd // config.n_head)
        else:
            x = x + self.transformer.wpe(positions)
        if config.bigram:
            if start > 0 and previous_token_ids is None:
                raise ValueError("a bigram model continuing a cache needs previous_token_ids, the token "
                                 "before input_ids (generate() passes it)")
            first = previous_token_ids if start > 0 else input_ids.new_full((B, 1), config.vocab_size)
            previous = torch.cat([first, input_ids[:, :-1]], dim=1)  # (B, T)
            if real is not None:  # after padding there is no previous token
                before = real[:, start - 1:start + T - 1] if start > 0 else torch.cat([real.new_zeros(B, 1), real[:, :T - 1]], 1)
                previous = torch.where(before, previous, config.vocab_size)
            x = x + self.bigram(previous * config.vocab_size + input_ids)
        x0 = x if config.x0_lambdas else None
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[i](input_ids) if config.value_embeds else None
            x = block(x, cache, rope, x0, ve, real)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if labels is not None:  # transformers' convention: labels are input_ids, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
