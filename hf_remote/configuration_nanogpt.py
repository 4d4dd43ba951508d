"""Configuration of a nanogpt-toolkit GPT for Hugging Face transformers (trust_remote_code).

export.py copies this file into every Hugging Face folder of a model that GPT-2's
architecture cannot express; modeling_nanogpt.py beside it computes the model. The
settings are nanogpt-toolkit's GPTConfig (model.py) under the same names, so config.json
reads like the checkpoint's model_args; transformers' usual names (hidden_size,
num_hidden_layers, ...) map onto them.
"""
from transformers import PretrainedConfig


class NanoGPTConfig(PretrainedConfig):
    model_type = "nanogpt"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True,
                 activation="gelu", norm="layernorm", rotary=False, qk_norm=False, tie_head=True,
                 bigram=False, x0_lambdas=False, value_embeds=False, **kwargs):
        self.vocab_size = vocab_size
        self.block_size = block_size  # longest context: positions 0..block_size-1
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.bias = bias  # biases in Linear layers and LayerNorms
        self.activation = activation  # MLP: gelu (exact), gelu_tanh (GPT-2's) or relu2 (relu(x)^2)
        self.norm = norm  # layernorm, or rmsnorm (without parameters)
        self.rotary = rotary  # rotary position embeddings on q and k instead of a learned table
        self.qk_norm = qk_norm  # RMSNorm of each head's queries and keys
        self.tie_head = tie_head  # the output head shares the token embedding
        self.bigram = bigram  # a learned vector per (previous token, token) pair added to the input
        self.x0_lambdas = x0_lambdas  # each block's input mixes the residual stream and the first input
        self.value_embeds = value_embeds  # a token embedding table per block added to attention's values
        kwargs["tie_word_embeddings"] = tie_head
        super().__init__(**kwargs)
