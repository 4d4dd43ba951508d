"""The model options beyond GPT-2 (model.ModelOptions) and the schedule options of train.py:
each one trains, resumes exactly, is saved in the checkpoint, samples, and decodes with the
KV cache exactly as without it; each is declared once, and the flags, --help, the checks and
the fast path follow from that declaration."""
import dataclasses

import pytest
import torch

import checkpoint
import config
import fast_decode
import sample
import train
import training
from conftest import TINY
from model import GPT, GPT2_EQUIVALENT, GPT2_SHAPE, MODEL_KEYS, GPTConfig, ModelOptions, apply_rotary

# each option alone, then all of them together (with Muon and the wsd schedule)
OPTIONS = {
    "rotary": ["--rotary=true"],
    "rmsnorm": ["--norm=rmsnorm"],
    "relu2": ["--activation=relu2"],
    "gelu_tanh": ["--activation=gelu_tanh"],
    "qk_norm": ["--qk_norm=true"],
    "untied_head": ["--tie_head=false", "--head_lr_scale=2.0"],
    "zero_init_proj": ["--zero_init_proj=true"],
    "bigram": ["--bigram=true"],
    "x0_lambdas": ["--x0_lambdas=true"],
    "value_embeds": ["--value_embeds=true", "--embed_lr_scale=3.0"],
    "all": ["--rotary=true", "--norm=rmsnorm", "--activation=relu2", "--qk_norm=true", "--tie_head=false",
            "--head_lr_scale=2.0", "--zero_init_proj=true", "--bigram=true", "--x0_lambdas=true",
            "--value_embeds=true", "--embed_lr_scale=3.0", "--optimizer=muon", "--lr_schedule=wsd",
            "--warmdown_frac=0.5", "--muon_momentum_warmup=4"],
}
MODEL_FLAGS = set(MODEL_KEYS)


def run_train(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_resumes_exactly_and_samples(name, tiny_data, tmp_path, capsys):
    """Stopped at iteration 4 and resumed to 6, a run ends bit-identical to one run to 6; the
    option is in the checkpoint's model_args, and sample.py builds the model from them."""
    flags = ["--eval_interval=2", "--lr_decay_iters=6", "--learning_rate=1e-2", *OPTIONS[name]]
    run_train(tiny_data, tmp_path / "full", "--max_iters=6", *flags)
    run_train(tiny_data, tmp_path / "part", "--max_iters=4", *flags)
    run_train(tiny_data, tmp_path / "part", "--max_iters=6", "--init_from=resume")
    full = checkpoint.load(tmp_path / "full" / "ckpt.pt")
    part = checkpoint.load(tmp_path / "part" / "ckpt.pt")
    assert part["iter_num"] == full["iter_num"] == 6
    for key, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][key]), key
    for flag in OPTIONS[name]:
        key, value = flag[2:].split("=")
        if key in MODEL_FLAGS:
            assert str(full["model_args"][key]).lower() == value, key
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'full'}", "--prompt=ROMEO:", "--max_new_tokens=40",
                 "--temperature=0", "--seed=1"])  # 40 new tokens slide past block_size 32
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) >= len("ROMEO:") + 40


def perturbed_model(**options) -> GPT:
    """A tiny model with every weight moved off its init: zero-init options would otherwise
    make parts of the model invisible to the comparisons below."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("options", [dict(rotary=True), dict(bigram=True), dict(qk_norm=True, norm="rmsnorm"),
                                     dict(x0_lambdas=True, value_embeds=True),
                                     dict(rotary=True, bigram=True, tie_head=False, activation="relu2")],
                         ids=["rotary", "bigram", "qk_norm+rmsnorm", "x0_lambdas+value_embeds", "mixed"])
def test_kv_cache_agrees_with_full_forward_past_block_size(options):
    """Greedy decoding with the cache (rotary at absolute positions, the bigram's previous
    token carried across calls) equals recomputing the window, also after the window slides."""
    model = perturbed_model(**options)
    idx = torch.randint(0, 20, (2, 3))
    with_cache = model.generate(idx, 25, temperature=0)
    without = model.generate(idx, 25, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


def test_the_context_grows_to_a_whole_block_before_the_window_slides():
    """generate() lets the context reach block_size tokens, then keeps the last block_size // 2
    and grows again (with and without the cache): the model reads between 4 and 8 of block 8."""
    model = perturbed_model()
    for use_cache in (False, True):
        seen = []

        def record(module, args, kwargs, seen=seen):  # the context the forward reads: cached + new tokens
            cache = kwargs.get("kv_cache")
            seen.append(args[0].shape[1] + (cache.length if cache is not None else 0))

        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            model.generate(torch.randint(0, 20, (2, 3)), 12, temperature=0, use_cache=use_cache)
        finally:
            hook.remove()
        assert seen == [3, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4], use_cache


def test_x0_lambdas_and_value_embeds_take_part_in_the_forward():
    """Each block mixes in the first input by its lambdas, and each block's value table reaches
    attention: changing either changes the logits (both start as no-ops: (1, 0) and zeros)."""
    fresh = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, x0_lambdas=True,
                          value_embeds=True))
    assert fresh.transformer.h[0].lambdas.tolist() == [1.0, 0.0] and not fresh.value_embeds[1].weight.any()
    model = perturbed_model(x0_lambdas=True, value_embeds=True)
    x = torch.randint(0, 20, (2, 8))
    before = model(x, x)[0]
    with torch.no_grad():
        model.transformer.h[1].lambdas.copy_(torch.tensor([1.0, 0.0]))
    after_lambdas = model(x, x)[0]
    with torch.no_grad():
        model.value_embeds[1].weight.zero_()
    assert not torch.allclose(before, after_lambdas) and not torch.allclose(after_lambdas, model(x, x)[0])


def test_rotary_positions_may_be_per_sequence():
    """Positions (T,) and the same positions per sequence (B, T) rotate alike, and a rotation
    keeps q . k a function of the distance only."""
    model = perturbed_model(rotary=True)
    x = torch.randn(2, 2, 5, 8)  # (B, nh, T, hs)
    positions = torch.arange(3, 8)
    shared = apply_rotary(x, *model.rotary(positions))
    per_sequence = apply_rotary(x, *model.rotary(positions.expand(2, 5)))
    assert torch.allclose(shared, per_sequence)
    q, k = torch.randn(8), torch.randn(8)
    dots = []
    for start in (0, 3):
        cos, sin = model.rotary(torch.tensor([start, start + 2]))
        qr = apply_rotary(q.expand(1, 1, 2, 8), cos, sin)[0, 0, 1]  # q at start + 2
        kr = apply_rotary(k.expand(1, 1, 2, 8), cos, sin)[0, 0, 0]  # k at start
        dots.append(qr @ kr)
    assert torch.allclose(dots[0], dots[1], atol=1e-5)


def test_bigram_reads_the_previous_token():
    model = perturbed_model(bigram=True)
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[5, 2, 3, 4]])  # differs only in the first token
    assert torch.equal(model.bigram_ids(a, None), torch.tensor([[20 * 20 + 1, 1 * 20 + 2, 2 * 20 + 3, 3 * 20 + 4]]))
    la, _ = model(a, a)
    lb, _ = model(b, b)
    assert not torch.allclose(la[:, 1], lb[:, 1])  # position 1 sees the changed previous token


def test_gpt2_defaults_and_the_list_of_options_in_use():
    assert GPTConfig().non_gpt2_options() == [] and GPTConfig(activation="gelu_tanh").non_gpt2_options() == []
    assert GPTConfig(zero_init_proj=True).non_gpt2_options() == []  # init only: the weights are GPT-2's
    cfg = GPTConfig(rotary=True, norm="rmsnorm", activation="relu2", qk_norm=True, tie_head=False, bigram=True,
                    x0_lambdas=True, value_embeds=True)
    assert cfg.non_gpt2_options() == ["activation=relu2", "norm=rmsnorm", "rotary=True", "qk_norm=True",
                                      "tie_head=False", "bigram=True", "x0_lambdas=True", "value_embeds=True"]
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, rotary=True,
                          norm="rmsnorm", bias=False, tie_head=False))
    names = set(model.state_dict())
    assert "transformer.wpe.weight" not in names and "transformer.h.0.ln_1.weight" not in names
    assert model.lm_head.weight is not model.transformer.wte.weight and not model.lm_head.weight.any()
    with pytest.raises(ValueError, match="activation must be"):
        GPT(GPTConfig(activation="swish"))


def test_checkpoint_from_before_the_options_resumes(tiny_data, tmp_path):
    """A checkpoint whose model_args predate the options resumes as the GPT-2 model it is."""
    run_train(tiny_data, tmp_path / "out", "--max_iters=2", "--eval_interval=2")
    path = tmp_path / "out" / "ckpt.pt"
    ckpt = checkpoint.load(path)
    ckpt["model_args"] = {k: v for k, v in ckpt["model_args"].items()
                          if k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}
    checkpoint.save(ckpt, path)
    run_train(tiny_data, tmp_path / "out", "--max_iters=4", "--init_from=resume")
    assert checkpoint.load(path)["iter_num"] == 4


def test_wsd_schedule_and_muon_momentum_warmup():
    cfg = training.TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, lr_decay_iters=110,
                            lr_schedule="wsd", warmdown_frac=0.5, muon_momentum_warmup=100)
    assert training.get_lr(0, cfg) == pytest.approx(1 / 11)
    assert training.get_lr(10, cfg) == training.get_lr(55, cfg) == 1.0  # constant until the warmdown
    assert training.get_lr(82.5, cfg) == pytest.approx(0.5)  # halfway through the warmdown
    assert training.get_lr(110, cfg) == pytest.approx(0.0) and training.get_lr(150, cfg) == 0.0
    assert training.get_muon_momentum(0, cfg) == pytest.approx(0.85)
    assert training.get_muon_momentum(50, cfg) == pytest.approx(0.90)
    assert training.get_muon_momentum(100, cfg) == training.get_muon_momentum(500, cfg) == 0.95


def test_untied_head_gets_its_own_learning_rate(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=3", "--eval_interval=3", "--tie_head=false",
              "--head_lr_scale=4.0", "--decay_lr=false", "--learning_rate=1e-3", "--optimizer=muon",
              "--muon_momentum_warmup=10")
    state = checkpoint.load(tmp_path / "out" / "ckpt.pt")["optimizer"]
    lrs = sorted(g["lr"] for g in state["adamw"]["param_groups"])
    assert lrs[-1] == pytest.approx(4e-3) and lrs[0] == pytest.approx(1e-3)
    assert state["muon"]["param_groups"][0]["momentum"] == pytest.approx(0.85 + 0.1 * 3 / 10)  # set for iteration 3, then saved


def test_embedding_tables_get_their_own_learning_rate_and_resume_keeps_it(tiny_data, tmp_path):
    flags = ["--eval_interval=3", "--bigram=true", "--rotary=false", "--embed_lr_scale=5.0", "--decay_lr=false",
             "--learning_rate=1e-3", "--optimizer=muon"]
    run_train(tiny_data, tmp_path / "out", "--max_iters=3", *flags)
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    groups = ckpt["optimizer"]["adamw"]["param_groups"]
    tables = [g for g in groups if g.get("lr_scale") == 5.0]
    assert len(tables) == 1 and tables[0]["lr"] == pytest.approx(5e-3)
    assert len(tables[0]["params"]) == 3  # wte, wpe and the bigram table
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups if g is not tables[0])
    run_train(tiny_data, tmp_path / "out", "--max_iters=6", "--init_from=resume")  # the saved scale, same groups
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["config"]["embed_lr_scale"] == 5.0


def test_our_muon_is_torchs_update_with_a_choice_of_dtype():
    """optim.Muon in bf16 is bit-identical to torch.optim.Muon, which orthogonalizes one matrix
    at a time (ours stacks the matrices of one shape: repeated shapes below); in float32 (used
    on CPUs without native bf16) it differs only by bf16's rounding, and loads torch's state."""
    import optim
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (48, 16), (16, 64), (16, 16), (48, 16)]
    params = {name: [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes] for name in ("torch", "bf16", "fp32")}
    for name in ("bf16", "fp32"):
        for p, q in zip(params[name], params["torch"]):
            p.data.copy_(q.data)
    kw = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opts = {"torch": torch.optim.Muon(params["torch"], **kw),
            "bf16": optim.Muon(params["bf16"], ns_dtype=torch.bfloat16, **kw),
            "fp32": optim.Muon(params["fp32"], ns_dtype=torch.float32, **kw)}
    for _ in range(3):
        grads = [torch.randn(*s) for s in shapes]
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad = g.clone()
            opt.step()
    for p, q, r in zip(params["torch"], params["bf16"], params["fp32"]):
        assert torch.equal(p, q)
        assert torch.allclose(p, r, atol=2e-3) and not torch.equal(p, r)
    opts["fp32"].load_state_dict(opts["torch"].state_dict())
    assert optim.newton_schulz_dtype("cuda") == torch.bfloat16


def test_stacked_newton_schulz_is_each_matrix_alone():
    """optim.orthogonalize runs a stack of same-shaped matrices through batched products; on
    this machine's kernels each result is the one-matrix iteration's (2-D products) bit for
    bit, in bf16 and float32, at the shapes of the CPU recipes' Muon matrices."""
    import optim
    a, b, c = coefficients = (3.4445, -4.7750, 2.0315)

    def alone(g, dtype):  # the iteration as torch.optim.Muon writes it, one matrix
        x = g.to(dtype)
        x = x.T if g.size(0) > g.size(1) else x
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if g.size(0) > g.size(1) else x
    torch.manual_seed(0)
    for shape in [(576, 192), (192, 192), (768, 192), (192, 768)]:
        stack = torch.randn(4, *shape)
        for dtype in (torch.bfloat16, torch.float32):
            out = optim.orthogonalize(stack, coefficients, 5, 1e-7, dtype)
            for g, x in zip(stack, out):
                assert torch.equal(x, alone(g, dtype)), (shape, dtype)


def test_eval_at_start_can_be_skipped(tiny_data, tmp_path):
    import json
    run_train(tiny_data, tmp_path / "out", "--max_iters=4", "--eval_interval=2", "--eval_at_start=false")
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "val/loss" in r] == [2, 4]


# ---------------------------------------------------------------------------- declared once

# A value other than the default for each option beyond GPT-2. An option added to
# model.ModelOptions fails the first test below until it has one here; then every check below
# runs on it: a train.py flag with the declared default and comment, in MODEL_KEYS, named by
# the GPT-2 check, and either computed exactly by the fast path or left to the plain one.
OTHER_VALUE = {"activation": "relu2", "norm": "rmsnorm", "rotary": True, "qk_norm": True, "tie_head": False,
               "zero_init_proj": True, "bigram": True, "x0_lambdas": True, "value_embeds": True}
TRAINING_DEFAULTS = {"bias": False}  # train.py's default where it is nanoGPT's training choice, not GPT-2's


def test_model_options_are_declared_once_and_the_rest_follows():
    options = {f.name: f for f in dataclasses.fields(ModelOptions)}
    assert set(OTHER_VALUE) == set(options) - set(GPT2_SHAPE), "give a new option a value in OTHER_VALUE"
    assert [f.name for f in dataclasses.fields(GPTConfig)] == [*options, "vocab_size"]  # the data's vocabulary
    assert set(MODEL_KEYS) == set(options) - {"dropout"}  # fixed once a model exists; dropout may change
    trains = {f.name: f for f in dataclasses.fields(training.TrainConfig)}
    declared, shown = config.field_comments(ModelOptions), config.field_comments(training.TrainConfig)
    help_text = config.help_text(training.TrainConfig, "train.py")
    for name, option in options.items():
        assert trains[name].type == option.type, name
        assert trains[name].default == TRAINING_DEFAULTS.get(name, option.default), name
        assert declared[name] and (shown[name] == declared[name] or name in TRAINING_DEFAULTS), name
        assert f"--{name}=" in help_text and shown[name] in help_text, name
    for name, value in OTHER_VALUE.items():
        cfg, _ = config.parse_config(training.TrainConfig, [f"--{name}={value}"])
        assert getattr(cfg, name) == value, name
        beyond_gpt2 = value not in GPT2_EQUIVALENT.get(name, ())
        assert GPTConfig(**{name: value}).non_gpt2_options() == ([f"{name}={value}"] if beyond_gpt2 else []), name


def test_model_options_are_checked_once_in_train_py_and_in_the_model():
    """The same check, named as its flag, whether train.py reads the setting or code builds the model."""
    bad = {"activation": "swish", "norm": "batchnorm", "n_head": 5, "dropout": 1.0}
    expected = ModelOptions(**bad).problems()
    assert len(expected) == 4 and all(p.startswith("--") for p in expected)
    assert GPTConfig(**bad).problems() == expected
    assert all(p in training.TrainConfig(**bad).problems() for p in expected)


@pytest.mark.parametrize("settings, expected", [
    (dict(), []),
    (dict(n_layer=0), ["--n_layer must be at least 1, got 0"]),
    (dict(n_head=0), ["--n_head must be at least 1, got 0"]),  # no divisibility check without heads
    (dict(n_embd=0, block_size=-1), ["--n_embd must be at least 1, got 0", "--block_size must be at least 1, got -1"]),
    (dict(dropout=0.0), []), (dict(dropout=1.0), ["--dropout must be in [0, 1), got 1.0"]),
    (dict(dropout=-0.1), ["--dropout must be in [0, 1), got -0.1"]),
    (dict(dropout=float("nan")), ["--dropout must be in [0, 1), got nan"]),
    (dict(n_embd=10, n_head=4), ["--n_embd (10) must be divisible by --n_head (4)"]),
    (dict(n_embd=10, n_head=4, n_layer=1), ["--n_embd (10) must be divisible by --n_head (4)"]),
    (dict(n_embd=10, n_head=4, n_layer=0), ["--n_layer must be at least 1, got 0"]),
    (dict(n_embd=7, n_head=1), []),
    (dict(n_embd=7, n_head=1, rotary=True),
     ["--rotary needs an even head size, got n_embd/n_head = 7; change --n_embd or --n_head"]),
    (dict(activation="swish"), ["--activation must be gelu, gelu_tanh or relu2, got 'swish'"]),
    (dict(norm="batchnorm"), ["--norm must be layernorm or rmsnorm, got 'batchnorm'"]),
    (dict(n_embd=6, n_head=2, rotary=True),
     ["--rotary needs an even head size, got n_embd/n_head = 3; change --n_embd or --n_head"]),
    (dict(n_embd=8, n_head=2, rotary=True), []),
    (dict(vocab_size=0), ["vocab_size must be at least 1, got 0"]), (dict(vocab_size=1), []),
    (dict(bigram=True, vocab_size=1024), []),
    (dict(bigram=True, vocab_size=1025), ["--bigram needs a vocabulary of at most 1024 tokens (its table has "
                                          "vocab_size^2 rows), got 1025; use it with char-level data, or pass "
                                          "--bigram=False (a CPU recipe turns it on)"]),
])
def test_each_setting_a_model_cannot_have_is_named_with_its_value(settings, expected):
    assert GPTConfig(**settings).problems() == expected


@pytest.mark.parametrize("name", list(OTHER_VALUE))
def test_the_fast_path_computes_each_option_or_leaves_it_to_the_model(name):
    model = perturbed_model(**{name: OTHER_VALUE[name]})
    decoder, why = fast_decode.decoder_for(model, 1, "float32")
    if name in fast_decode.NOT_IMPLEMENTED:
        assert decoder is model and name in why
        return
    assert isinstance(decoder, fast_decode.FastDecoder), why
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        cache = decoder.new_cache()
        decoder.next_logits(idx[:, :-1], cache)  # the prompt: the model's own forward fills the cache
        stepped = decoder.eager_step(idx[:, -1], cache)  # the last token: the fast path's own step
        assert torch.allclose(stepped, model(idx)[0][:, -1], atol=1e-5)


# ---------------------------------------------------------------- each option computes what it names
# (mutation testing found these behaviours unchecked: a wrong value here still trains, resumes
# exactly and decodes the same with and without the cache, so only a direct check catches it)

def test_rotary_angles_are_roformers():
    """Channel pair (i, i + hs/2) of a token at position p turns by p / 10000^(2i/hs): cos and sin
    of that angle, with the first half rotated one way and the second the other."""
    hs, positions = 8, torch.tensor([0, 1, 5, 7])
    model = perturbed_model(rotary=True)
    cos, sin = model.rotary(positions)
    angles = positions[:, None].double() / 10000 ** (torch.arange(0, hs, 2).double() / hs)
    assert torch.allclose(cos.double(), angles.cos(), atol=1e-6) and torch.allclose(sin.double(), angles.sin(), atol=1e-6)
    x = torch.randn(1, 1, 4, hs)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    c, s = angles.cos().float(), angles.sin().float()
    expected = torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)
    assert torch.allclose(apply_rotary(x, cos, sin), expected, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_rmsnorm_is_x_over_its_rms_with_float32_eps(grad):
    """norm=rmsnorm is x / sqrt(mean(x^2) + eps), eps float32's machine epsilon (F.rms_norm's
    default), in inference and in training (where the C kernels compute it): on small
    activations a larger eps would shrink the output."""
    from model import make_norm
    norm = make_norm(GPTConfig(norm="rmsnorm", n_embd=64))
    torch.manual_seed(0)
    x = (torch.randn(4, 32, 64) * 1e-3).requires_grad_(grad)  # 8192 values: the C kernels' size
    with torch.set_grad_enabled(grad):
        y = norm(x)
    xd = x.detach().double()
    expected = xd / (xd.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
    assert torch.allclose(y.detach().double(), expected, rtol=1e-5, atol=0)


def test_value_embeds_are_added_to_the_values():
    """With one token, attention's output is its value whatever the query: a value_embeds table
    then still changes the logits (it would not if it reached the queries or keys)."""
    model = perturbed_model(value_embeds=True)
    x = torch.tensor([[3], [7]])
    before = model(x)[0]
    with torch.no_grad():
        for table in model.value_embeds:
            table.weight.add_(1.0)
    assert not torch.allclose(before, model(x)[0])


def test_training_forward_with_qk_norm_rotary_and_value_embeds_is_the_inference_one():
    """The training forward (on a CPU, the one-pass qk_heads kernel where it applies) gives the
    same logits as inference for qk_norm + rotary + value_embeds: the value tables are not lost."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=64, qk_norm=True,
                          rotary=True, value_embeds=True, norm="rmsnorm"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()  # no dropout; grad enabled below as in training
    x = torch.randint(0, 20, (2, 16))
    trained = model(x, x)[0]
    with torch.no_grad():
        inferred = model(x, x)[0]
    assert torch.allclose(trained.detach(), inferred, atol=1e-4)


def test_tie_head_and_the_zero_inits():
    """tie_head (default) shares one matrix between wte and lm_head; untied, the head starts at
    zero; zero_init_proj starts every c_proj at zero, and without it they are random."""
    tied = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert all(p.any() for n, p in tied.named_parameters() if n.endswith("c_proj.weight"))
    untied = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, tie_head=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert not untied.lm_head.weight.any() and untied.transformer.wte.weight.any()
    zero = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, zero_init_proj=True))
    projections = [p for n, p in zero.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and not any(p.any() for p in projections)


@pytest.mark.parametrize("options", [{}, dict(rotary=True)], ids=["wpe", "rotary"])
def test_a_prompt_cached_in_two_chunks_gives_the_full_forwards_logits(options):
    """Several new tokens after cached ones (a prompt fed in chunks) see the cached keys and
    the new ones up to their own position only."""
    model = perturbed_model(**options)
    from model import KVCache
    idx = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        full = model(idx, idx)[0]  # every position's logits
        for split in (1, 3, 5):
            cache = KVCache(model.config.n_layer, model.config.block_size)
            model(idx[:, :split], kv_cache=cache)
            for end in range(split + 1, 8):  # the last position of each longer prefix, as one chunk
                c = KVCache(model.config.n_layer, model.config.block_size)
                model(idx[:, :split], kv_cache=c)
                logits = model(idx[:, split:end], kv_cache=c)[0][:, -1]
                assert torch.allclose(logits, full[:, end - 1], atol=1e-5), (split, end)


def test_crop_block_size_keeps_the_first_positions_and_the_same_outputs():
    model = perturbed_model()
    idx = torch.randint(0, 20, (2, 5))
    wpe = model.transformer.wpe.weight.detach().clone()
    with torch.no_grad():
        before = model(idx, idx)[0]
    model.crop_block_size(5)
    assert model.config.block_size == 5 and torch.equal(model.transformer.wpe.weight, wpe[:5])
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], before)
    with pytest.raises(ValueError, match="exceeds block_size 5"):
        model(torch.randint(0, 20, (1, 6)))
    assert model.generate(idx, 3, temperature=0).shape == (2, 8)  # the window slides within 5


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_and_muon_take_the_parameters_they_should(name):
    """Weight decay on every 2-D weight (matrices, embedding tables, the head) and on nothing
    1-D (biases, LayerNorm weights, x0 lambdas); Muon takes exactly the 2-D weights inside the
    blocks, AdamW everything else, each parameter once."""
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, tie_head=False,
                          bigram=True, value_embeds=True, x0_lambdas=True))
    for embed_lr_scale in (1.0, 3.0):
        opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", name=name, head_lr_scale=2.0,
                                        embed_lr_scale=embed_lr_scale)
        adamw = opt.adamw if name == "muon" else opt
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {names[id(p)]: g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
        assert sum(len(g["params"]) for g in adamw.param_groups) == len(decay)
        for n, wd in decay.items():
            assert wd == (0.1 if model.get_parameter(n).dim() >= 2 else 0.0), (n, wd)
        hidden = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
        if name == "muon":
            muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
            assert muon == hidden and not muon & set(decay)
            assert opt.muon.param_groups[0]["weight_decay"] == 0.1
            assert set(decay) | muon == set(names.values())
        else:
            assert set(decay) == set(names.values())


def test_newton_schulz_dtype_follows_the_hardware(monkeypatch):
    import hardware
    import optim
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert optim.newton_schulz_dtype("cpu") == expected
        assert optim.newton_schulz_dtype("cuda") == torch.bfloat16
        assert optim.newton_schulz_dtype("mps") == torch.float32


def test_muon_adamw_zero_grad_clears_both_optimizers():
    model = perturbed_model()
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu", name="muon")
    x = torch.randint(0, 20, (2, 8))
    model.train()
    model(x, x)[1].backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_relu2_is_relu_squared(grad):
    """activation=relu2 is relu(x)^2, with the gradient 2 relu(x), by torch's ops and (on a CPU,
    for larger tensors) by the C kernels."""
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=64, activation="relu2"))
    torch.manual_seed(0)
    for shape in ((2, 8, 64), (4, 16, 256)):  # torch's ops below 4096 values, the C kernels above
        x = (torch.randn(*shape) * 3).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = model.transformer.h[0].mlp.act(x)
        check_relu_squared(x, y, grad)


def check_relu_squared(x, y, grad):
    expected = x.detach().clamp(min=0) ** 2
    assert torch.allclose(y.detach(), expected, rtol=1e-6)
    if grad:
        y.sum().backward()
        assert torch.allclose(x.grad, 2 * x.detach().clamp(min=0), rtol=1e-6)


def test_our_muon_with_the_original_lr_adjustment_is_torchs():
    """adjust_lr_fn=None / "original" (Keller Jordan's sqrt(max(1, rows / cols))) gives
    torch.optim.Muon's update bit for bit in bf16, on tall and wide matrices."""
    import optim
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 64), (16, 16)]
    for adjust in (None, "original"):
        ours = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        kw = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust)
        opts = [optim.Muon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(theirs, **kw)]
        for _ in range(2):
            grads = [torch.randn(*s) for s in shapes]
            for params, opt in zip((ours, theirs), opts):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), (adjust, p.shape)
