"""LoRA and gradient checkpointing: only the adapters train, the merged weights give the
adapted model's logits, and checkpointed training gives the same weights as plain training."""
import copy

import pytest
import torch

import lora
from model import GPT, GPTConfig

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True)


def tiny_model(seed=0, **options):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG, **options}))


def batch(seed=1, B=4, T=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG["vocab_size"], (B, T), generator=g)
    return x, torch.roll(x, -1, dims=1)


def train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x, y = batch(seed=i)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_only_adapters_train_and_merge_gives_the_same_logits():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    n_trainable = lora.apply(model, lora.LoRAConfig(rank=4, dropout=0.0))
    # c_attn (32 -> 96) and attn.c_proj, mlp.c_proj (32 <- 32, 128) in each of 2 blocks
    per_block = 4 * (32 + 96) + 4 * (32 + 32) + 4 * (128 + 32)
    assert n_trainable == 2 * per_block
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x, _ = batch()
    with torch.no_grad():  # B starts at zero: the adapted model starts as the pretrained one
        assert torch.equal(model.eval()(x, x)[0], _plain(base)(x, x)[0])
    train(model)
    state = model.state_dict()
    for k, v in base.items():  # the pretrained weights did not move
        assert torch.equal(state[k], v), k
    merged = lora.merge_state_dict(state, lora.LoRAConfig(rank=4, dropout=0.0).to_dict())
    assert set(merged) == set(base)
    plain = _plain(merged)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x, x)[0], model(x, x)[0], atol=1e-5)
        assert not torch.allclose(_plain(base)(x, x)[0], model(x, x)[0], atol=1e-3)  # it learned something


def _plain(state):
    model = GPT(GPTConfig(**CONFIG))
    model.load_state_dict(state)
    return model.eval()


def test_targets_and_bad_settings():
    model = tiny_model()
    lora.apply(model, lora.LoRAConfig(rank=2, targets="c_fc"))
    assert [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)] == \
        ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    problems = lora.LoRAConfig(rank=0, alpha=-1, dropout=1.0, targets="q_proj").problems()
    assert len(problems) == 4 and "--lora_targets" in problems[-1]


def test_train_settings_make_the_lora_config():
    """train.py's --lora_* flags become the LoRAConfig the adapters are built with and that the
    checkpoint saves for merging: each one, --lora_alpha's scale too."""
    from training import TrainConfig
    cfg = TrainConfig(lora_rank=4, lora_alpha=32.0, lora_dropout=0.2, lora_targets="c_fc")
    got = lora.from_settings(cfg)
    assert got == lora.LoRAConfig(rank=4, alpha=32.0, dropout=0.2, targets="c_fc") and got.scale == 8.0
    assert lora.from_settings(TrainConfig()) is None  # lora_rank 0: no LoRA
    model = tiny_model()
    lora.apply(model, got)
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.scale == 8.0 and layer.lora_dropout.p == 0.2


def test_dropout_falls_on_the_adapters_input_in_training_only():
    """lora_dropout drops the adapters' input while training (so two training passes differ), never
    the frozen layer's (with B zero, a training pass is the plain layer's exactly); in eval mode
    the layer is x W^T + b + scale * x A^T B^T."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(32, 48), lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
    x = torch.randn(4, 32)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), plain)  # B starts at zero: dropout or not, the update is zero
        layer.lora_B.normal_()
        assert not torch.allclose(layer(x), layer(x))
        layer.eval()
        expected = plain + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
        assert torch.allclose(layer(x), expected, atol=1e-5) and torch.equal(layer(x), layer(x))


def assert_checkpointing_trains_the_same(plain, seed: int):
    """Train plain and a copy with grad_checkpoint from the same seed: the weights agree to 1e-5.
    Returns the checkpointed copy."""
    checkpointed = copy.deepcopy(plain)
    checkpointed.grad_checkpoint = True
    torch.manual_seed(seed)
    train(plain)
    torch.manual_seed(seed)
    train(checkpointed)
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    return checkpointed


@pytest.mark.parametrize("options", [{}, {"dropout": 0.1}, {"rotary": True, "x0_lambdas": True}])
def test_grad_checkpoint_trains_the_same_weights(options):
    assert_checkpointing_trains_the_same(tiny_model(**options), seed=5)


def test_grad_checkpoint_with_lora_and_never_when_decoding(monkeypatch):
    plain = tiny_model()
    lora.apply(plain, lora.LoRAConfig(rank=4))
    checkpointed = assert_checkpointing_trains_the_same(plain, seed=3)
    calls, original = [], torch.utils.checkpoint.checkpoint  # the real function, counted
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed.eval()
    checkpointed.generate(batch()[0][:1, :4], 3)
    checkpointed.train()
    checkpointed(*batch())
    assert len(calls) == CONFIG["n_layer"]  # the training forward only, once per block
