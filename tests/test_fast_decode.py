"""fast_decode.py, the fast CPU decoding path: it agrees with model.py's float32 path (greedy
tokens wherever the logits leave a margin, seeded sampling, sliding past block_size, with
and without the cache), falls back to the plain path for models it does not know, and
sample.py uses it by default on CPU and prints the choice."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fast_decode
import hardware
import sample
from fast_decode import FastDecoder, decoder_for, supported, val_loss
from model import GPT, GPTConfig

BLOCK = 32
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(shakespeare_text):
    chars = sorted(set(shakespeare_text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in shakespeare_text[:120_000]])
    return chars, ids[:100_000], ids[100_000:]  # vocabulary, train, val


@pytest.fixture(scope="module")
def trained(corpus):
    """A 2x48 char model trained 200 steps on Shakespeare: its logits have the peaked shape
    of a real model's, which random weights lack (a few seconds on one thread)."""
    chars, train_ids, _ = corpus
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=48, dropout=0.0))
    optimizer = model.configure_optimizer(0.0, 3e-3, (0.9, 0.99), "cpu")
    for _ in range(200):
        starts = torch.randint(len(train_ids) - BLOCK - 1, (16,)).tolist()
        x = torch.stack([train_ids[s:s + BLOCK] for s in starts])
        y = torch.stack([train_ids[s + 1:s + BLOCK + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 2.6  # it learned something: uniform guessing is ln(65) = 4.2
    return model.eval()


def prompt(corpus, length=10, batch=1):
    _, _, val_ids = corpus
    return torch.stack([val_ids[i * 50:i * 50 + length] for i in range(batch)])


@pytest.mark.parametrize("weights, margin", [("float32", 1e-4), ("int8", 0.1)])
def test_greedy_equals_float32_wherever_the_logits_leave_a_margin(trained, corpus, weights, margin):
    """Along the float32 path's own greedy text, past block_size (the window slides as in
    GPT.generate_stream): at every step where float32's best token leads the runner-up by more
    than `margin`, the fast path picks it too."""
    decoder = FastDecoder(trained, weights)
    cache = decoder.new_cache()
    tokens = prompt(corpus)
    T, n = tokens.size(1), 2 * BLOCK + 5  # slides twice
    start, cached = 0, 0  # the window's first token; how many of it the decoder has cached
    agree, clear = 0, 0
    with torch.inference_mode():
        for step in range(n):
            end = T + step
            if end - start > BLOCK:
                start, cached = end - BLOCK // 2, 0
            reference = trained(tokens[:, start:end])[0][0, -1]  # no cache: the plain reference
            if cached == 0:
                cache.reset()
            fast = decoder.next_logits(tokens[:, start + cached:end], cache)[0]
            cached = end - start
            best, runner_up = reference.topk(2).values
            if best - runner_up > margin:
                clear += 1
                agree += fast.argmax().item() == reference.argmax().item()
            tokens = torch.cat([tokens, reference.argmax().view(1, 1)], dim=1)
    assert clear > n // 2  # a trained model is mostly decided: the test compares something
    assert agree == clear


def test_float32_weights_give_the_same_greedy_text_with_sliding_and_without_cache(trained, corpus):
    idx = prompt(corpus, length=BLOCK + 7, batch=3)  # a prompt longer than the window, 3 at once
    decoder = FastDecoder(trained, "float32")
    expected = trained.generate(idx, 3 * BLOCK, temperature=0)
    assert torch.equal(decoder.generate(idx, 3 * BLOCK, temperature=0), expected)
    assert torch.equal(decoder.generate(idx, 3 * BLOCK, temperature=0, use_cache=False), expected)
    assert torch.equal(trained.generate(idx, 3 * BLOCK, temperature=0, use_cache=False), expected)


def test_generations_running_at_once_do_not_share_a_cache(trained, corpus):
    """A web demo may step two generations of one decoder in turn: each has its own cache."""
    decoder = FastDecoder(trained, "float32")
    a, b = prompt(corpus, length=5), prompt(corpus, length=12)[:, 4:]
    # seeded sampling (one generator each), so the two texts differ whatever greedy would do
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    alone = [decoder.generate(p, BLOCK, temperature=1.0, generator=gen(i))[0, p.size(1):].tolist()
             for i, p in enumerate((a, b))]
    streams = [decoder.generate_stream(p, BLOCK, temperature=1.0, generator=gen(i)) for i, p in enumerate((a, b))]
    together = [[], []]
    for _ in range(BLOCK):
        for i, stream in enumerate(streams):
            together[i].append(next(stream).item())
    assert together == alone and alone[0] != alone[1]


@pytest.mark.parametrize("options", [dict(temperature=0.8), dict(temperature=1.0, top_k=5),
                                     dict(temperature=0.7, top_k=10, top_p=0.8)])
def test_seeded_sampling_matches_the_float32_path(trained, corpus, options):
    """Same seed, same options: float32 weights draw the same text as model.generate (the
    probabilities differ by rounding only); int8 is reproducible, and differs with the seed."""
    idx = prompt(corpus, batch=2)
    n = BLOCK + 10

    def draw(generate, seed):
        return generate(idx, n, generator=torch.Generator().manual_seed(seed), **options)

    assert torch.equal(draw(FastDecoder(trained, "float32").generate, 1), draw(trained.generate, 1))
    int8 = FastDecoder(trained, "int8").generate
    assert torch.equal(draw(int8, 1), draw(int8, 1))
    assert not torch.equal(draw(int8, 1), draw(int8, 2))


def test_sampling_options_restrict_the_choice(trained, corpus):
    """top_k=1 and a tiny top_p are greedy; top_k=3 draws only among the step's three best."""
    idx = prompt(corpus)
    decoder = FastDecoder(trained, "int8")
    greedy = decoder.generate(idx, 20, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(decoder.generate(idx, 20, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(decoder.generate(idx, 20, temperature=1.0, top_p=1e-6, generator=g), greedy)
    text = decoder.generate(idx, 20, temperature=2.0, top_k=3, generator=g)
    for t in range(idx.size(1), text.size(1)):
        best3 = decoder.stepping(text[:, :t])[0][0, -1].topk(3).indices.tolist()
        assert text[0, t].item() in best3


def test_int8_val_loss_is_close_to_float32(trained, corpus):
    """The quantized model's loss over a whole val split, against the float32 model's (the
    trained shakespeare model's figure is in the README)."""
    _, _, val_ids = corpus
    reference = val_loss(lambda x: trained(x, x)[0], val_ids, BLOCK)
    int8 = val_loss(lambda x: fast_decode.quantized(trained)(x, x)[0], val_ids, BLOCK)
    assert reference < 2.6
    assert abs(int8 - reference) < 0.01


def test_int8_linear_is_close_to_the_float_one():
    torch.manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(64, 96, bias=bias)
        x = torch.randn(5, 3, 64)
        y = fast_decode.Int8Linear(linear)(x)
        assert y.shape == (5, 3, 96) and y.dtype == torch.float32
        assert (y - linear(x)).abs().max() < 0.02 * linear(x).abs().max()


def test_int8_linear_gives_the_dtype_asked_for():
    """bf16 out for the MLP's hidden layer (the input the next kernel takes), float32 by default."""
    for bias in (True, False):
        int8 = fast_decode.Int8Linear(torch.nn.Linear(64, 96, bias=bias))
        for x in (torch.randn(2, 64), torch.randn(2, 3, 64)):
            assert int8(x).dtype == torch.float32 and int8(x, torch.bfloat16).dtype == torch.bfloat16

@dataclasses.dataclass
class LaterConfig(GPTConfig):
    later_option: bool = False  # an option a later model.py may grow, unknown to fast_decode


class DoubledLogits(GPT):
    """A model whose forward differs from the architecture fast_decode knows."""

    def forward(self, idx, targets=None, kv_cache=None):
        logits, loss = super().forward(idx, targets, kv_cache)
        return 2 * logits, loss


def test_models_it_does_not_know_fall_back_to_the_plain_path(trained):
    args = dict(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    assert supported(trained) is None
    assert "later_option=True" in supported(GPT(LaterConfig(**args, later_option=True)))
    assert supported(GPT(LaterConfig(**args, later_option=False))) is None  # the default is GPT-2's
    swapped = GPT(GPTConfig(**args))
    swapped.transformer.h[0].mlp.c_fc = torch.nn.Identity()
    assert "mlp.c_fc" in supported(swapped)
    doubled = DoubledLogits(GPTConfig(**args)).eval()
    decoder, why = decoder_for(doubled, 1, "float32")
    assert decoder is doubled and "differ" in why
    decoder, why = decoder_for(trained, 1, "auto")
    assert isinstance(decoder, FastDecoder) and decoder.weights in why


OPTIONS = [dict(norm="rmsnorm"), dict(rotary=True), dict(qk_norm=True), dict(activation="relu2"),
           dict(activation="gelu_tanh"), dict(tie_head=False), dict(bigram=True), dict(bias=False),
           dict(x0_lambdas=True), dict(value_embeds=True),
           dict(norm="rmsnorm", rotary=True, qk_norm=True, activation="relu2", tie_head=False,
                zero_init_proj=True, bigram=True, bias=False, x0_lambdas=True, value_embeds=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_model_option_runs_on_the_fast_path_with_the_models_own_results(options):
    """Each option of model.py (and all at once) runs on the fast path: the step gives the same
    logits as the model's own forward, the same greedy text past
    block_size (the window slides, the bigram's previous token restarts), and int8 close."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    with torch.no_grad():  # away from the zero inits (untied head, bigram), so every part counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    decoder, why = decoder_for(model, 1, "float32", compile=False)
    assert isinstance(decoder, FastDecoder), why
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    cache = decoder.new_cache()
    model(idx[:, :-1], kv_cache=cache)
    assert torch.allclose(decoder.step(idx[:, -1], cache), model(idx)[0][:, -1], atol=1e-5)
    expected = model.generate(idx, 40, temperature=0)  # slides twice
    assert torch.equal(decoder.generate(idx, 40, temperature=0), expected)
    assert torch.equal(decoder.generate(idx, 40, temperature=0, use_cache=False), expected)
    int8, cache = FastDecoder(model, "int8"), decoder.new_cache()
    model(idx[:, :-1], kv_cache=cache)
    logits, reference = int8.step(idx[:, -1], cache), model(idx)[0][:, -1]
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


class EagerGraph:
    """fast_decode.record's graph without CUDA: each replay runs the recorded step again and
    writes its output in place, as a graph's replay does. GraphDecoder's own code runs around it."""

    def __init__(self, run):
        self.run, self.output = run, run()

    def replay(self):
        self.output.copy_(self.run())


@pytest.fixture
def eager_graphs(monkeypatch):
    """GraphDecoder on a CPU (or, on a GPU, without CUDA graphs): the list of its recordings."""
    recorded = []

    def record(run, device):
        recorded.append(EagerGraph(run))
        return recorded[-1], recorded[-1].output

    monkeypatch.setattr(fast_decode, "record", record)
    return recorded


def precision(device="cpu", dtype="float32"):
    return hardware.Precision(device, dtype, "the test's")


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_model_option_gives_the_models_own_results_through_the_graph_step(options, eager_graphs):
    """What a CUDA graph replays (the step at a position held in a tensor, attention over the
    whole cache with later positions masked) gives the model's logits and greedy text, past
    block_size too, for every option of model.py. Checked here on a CPU; on a GPU the graph
    itself (test_cuda_graph_replays_what_the_step_computes)."""
    model = small_model(**options)
    decoder, why = fast_decode.graph_decoder_for(model, precision(), 1)
    assert isinstance(decoder, fast_decode.GraphDecoder), why
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    cache = decoder.new_cache()
    model(idx[:, :-1], kv_cache=cache)
    assert cache.zeros and not cache.k[0][:, :, idx.size(1) - 1:].any()  # what the masked step reads: zeros
    assert torch.allclose(decoder.step(idx[:, -1], cache), model(idx)[0][:, -1], atol=1e-5)
    assert torch.equal(decoder.generate(idx, 40, temperature=0), model.generate(idx, 40, temperature=0))
    assert len(eager_graphs) == 3  # the check's, the step above's and the generation's (new buffers)


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("path", ["cpu", "graph"])
def test_the_fast_paths_at_the_smallest_blocks(block_size, path, eager_graphs):
    """A block of one token (a bigram model) has no one-token step to speed up (each token
    refills the window): the model's own path, which keeps one token when the window slides;
    a block of two slides to one cached token and steps from there."""
    model = GPT(GPTConfig(block_size=block_size, vocab_size=11, n_layer=1, n_head=2, n_embd=16)).eval()
    if path == "cpu":
        decoder, why = decoder_for(model, 1, "float32", compile=False)
    else:
        decoder, why = fast_decode.graph_decoder_for(model, precision(), 1)
    assert (decoder is model) == (block_size == 1), why
    idx = torch.tensor([[1, 2, 3]])
    expected = model.generate(idx, 9, temperature=0)
    assert expected.shape == (1, 12) and torch.equal(decoder.generate(idx, 9, temperature=0), expected)


def test_graph_steps_of_two_generations_in_turn_capture_again(trained, corpus, eager_graphs):
    """A graph reads one cache's buffers: two generations stepped in turn (a web demo's) each
    get their own text, the graph recorded again whenever the other one steps."""
    decoder = fast_decode.GraphDecoder(trained, precision())
    a, b = prompt(corpus, length=5), prompt(corpus, length=12)[:, 4:]
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    alone = [decoder.generate(p, 10, temperature=1.0, generator=gen(i))[0, p.size(1):].tolist()
             for i, p in enumerate((a, b))]
    streams = [decoder.generate_stream(p, 10, temperature=1.0, generator=gen(i)) for i, p in enumerate((a, b))]
    together = [[], []]
    for _ in range(10):
        for i, stream in enumerate(streams):
            together[i].append(next(stream).item())
    assert together == alone and alone[0] != alone[1]
    assert len(eager_graphs) > 2 * 9  # a step after the other's records again


def test_the_graph_step_under_autocast_reads_matrices_cast_once(trained, eager_graphs):
    """Under bf16 autocast the step runs on a copy whose block matrices and head are bf16 (the
    values autocast casts to), everything else the model's own; the model is left as it was."""
    decoder = fast_decode.GraphDecoder(trained, precision(dtype="bfloat16"))
    low, block = decoder.stepping, decoder.stepping.transformer.h[0]
    assert block.attn.c_attn.weight.dtype == torch.bfloat16 and low.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(block.mlp.c_fc.weight, trained.transformer.h[0].mlp.c_fc.weight.to(torch.bfloat16))
    assert low.transformer.wte.weight is trained.transformer.wte.weight and block.ln_1.weight is trained.transformer.h[0].ln_1.weight
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert decoder.matches_model(batch_size=2)


def test_a_graph_that_cannot_be_recorded_falls_back_to_the_model_with_one_line(trained, monkeypatch):
    def record(run, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fast_decode, "record", record)
    lines = []
    decoder, how = fast_decode.graph_decoder_for(trained, precision(), 1, log=lines.append)
    assert decoder is trained and "CUDA graph failed" in how
    assert len(lines) == 1 and "could not capture" in lines[0] and "not permitted" in lines[0]
    monkeypatch.setattr(fast_decode, "record", lambda run, device: (graph := EagerGraph(run), graph.output))
    doubled = DoubledLogits(trained.config)
    doubled.load_state_dict(trained.state_dict())
    decoder, how = fast_decode.graph_decoder_for(doubled.eval(), precision(), 1, log=lines.append)
    assert decoder is doubled and "differ" in how


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replays_what_the_step_computes(trained, corpus, dtype, monkeypatch):
    """On a GPU: generation.choose_decoder picks the CUDA graph for --dtype=auto; its replays
    give the text the same step gives run eagerly, and logits within autocast's rounding of the
    model's own."""
    import copy as copy_module

    import generation
    model = copy_module.deepcopy(trained).cuda()
    idx = prompt(corpus, length=BLOCK + 7, batch=2).cuda()
    graphed = fast_decode.GraphDecoder(model, precision("cuda", dtype))
    assert graphed.matches_model(batch_size=2)
    with graphed.autocast():
        text = graphed.generate(idx, 3 * BLOCK, temperature=0)
    monkeypatch.setattr(fast_decode, "record", lambda run, device: (graph := EagerGraph(run), graph.output))
    eager = fast_decode.GraphDecoder(model, precision("cuda", dtype))
    with eager.autocast():
        assert torch.equal(eager.generate(idx, 3 * BLOCK, temperature=0), text)
    monkeypatch.undo()
    decoder, how = generation.choose_decoder(model, generation.GenerationConfig(), precision("cuda", dtype))
    assert isinstance(decoder, fast_decode.GraphDecoder) and "CUDA graph" in how, how


def test_choose_weights_says_what_it_measured(trained):
    weights, why = fast_decode.choose_weights(trained, batch_size=2)
    assert weights in ("float32", "int8")
    assert "ms int8" in why and "ms float32" in why


def small_model(**options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_quantized_swaps_only_the_block_matrices_of_a_copy():
    model = small_model()
    int8 = fast_decode.quantized(model)
    for block, original in zip(int8.transformer.h, model.transformer.h):
        linears = fast_decode._block_linears(block)
        assert all(isinstance(lin, fast_decode.Int8Linear) for lin in linears)
        assert all(type(lin) is torch.nn.Linear for lin in fast_decode._block_linears(original))
        assert block.ln_1.weight is original.ln_1.weight  # shared, not copied
    assert int8.transformer.wte.weight is model.transformer.wte.weight and int8.lm_head.weight is model.lm_head.weight
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    assert (int8(idx)[0] - model(idx)[0]).abs().max() < 0.05 * model(idx)[0].abs().max()


def test_matches_model_tells_a_step_that_computes_the_model_from_one_that_does_not():
    args = dict(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    plain = GPT(GPTConfig(**args)).eval()
    assert fast_decode.matches_model(FastDecoder(plain)) and fast_decode.matches_model(FastDecoder(plain, "int8"))
    doubled = DoubledLogits(GPTConfig(**args)).eval()
    assert not fast_decode.matches_model(FastDecoder(doubled))
    assert not fast_decode.matches_model(FastDecoder(doubled, "int8"))  # checked against float32 all the same


def test_step_key_names_everything_a_compiled_step_depends_on():
    model = small_model()
    key = fast_decode.step_key(model, "float32", 1)
    assert json.loads(key)["config"]["n_embd"] == 32 and "dropout" not in json.loads(key)["config"]
    others = [fast_decode.step_key(model, "int8", 1), fast_decode.step_key(model, "float32", 2),
              fast_decode.step_key(small_model(rotary=True), "float32", 1)]
    assert len({key, *others}) == 4
    model.config.dropout = 0.1  # dropout does not change a decoding step
    assert fast_decode.step_key(model, "float32", 1) == key


def test_val_loss_is_the_mean_cross_entropy_over_every_window():
    model = small_model()
    data = torch.randint(0, 23, (3 * 16 + 5,))  # three windows of 16 and 17 targets; the tail is left out
    x, y = data[:48].view(3, 16), data[1:49].view(3, 16)
    expected = torch.nn.functional.cross_entropy(model(x, y)[0].flatten(0, 1), y.flatten()).item()
    for batch_size in (1, 2, 16):
        got = val_loss(lambda idx: model(idx, idx)[0], data, 16, batch_size)
        assert got == pytest.approx(expected, rel=1e-5), batch_size


@pytest.mark.parametrize("kept", ["float32", "int8"])
def test_a_kept_compiled_step_decides_the_weights_without_timing(trained, tmp_path, monkeypatch, kept):
    """With one format's compiled step in the cache, weights=auto takes that format (the choice
    by timing could differ from process to process and miss the kept step); --compile=false
    still times."""
    if kept == "int8" and not fast_decode.int8_available():
        pytest.skip("no int8 kernel in this torch build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = fast_decode.step_path(fast_decode.step_key(trained, kept, 1))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a package")  # found, then refused when loaded: the eager step runs
    decoder, how = decoder_for(trained, 1, "auto", None, new_tokens=1, log=lambda line: None)
    assert decoder.weights == kept and "compiled step is kept" in how and decoder.compiled is None
    decoder, how = decoder_for(trained, 1, "auto", False)
    assert "measured on this CPU" in how or "not 10% faster" in how or "not available" in how


def test_the_timed_choice_of_weights_is_kept_so_a_seed_gives_one_text(trained, corpus, tmp_path, monkeypatch):
    """int8 and float32 give slightly different numbers, and their timing can come out either
    way from one process to the next: the first process's choice is kept in the cache, and every
    later one decodes alike, so the same seed gives the same text."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first, how = decoder_for(trained, 1, "auto", False)
    assert "kept in" not in how
    choices = iter(["int8", "float32"] * 3)  # a timing that would flip every time
    monkeypatch.setattr(fast_decode, "choose_weights", lambda model, batch_size: (next(choices), "timed"))
    idx = prompt(corpus)
    texts = set()
    for _ in range(3):
        decoder, how = decoder_for(trained, 1, "auto", False)
        assert decoder.weights == first.weights and "kept in" in how
        texts.add(tuple(decoder.generate(idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))[0].tolist()))
    assert len(texts) == 1
    decoder, how = decoder_for(trained, 2, "auto", False)  # another batch size is timed afresh
    assert how == "fast CPU path, timed"


def save(model, chars, out_dir):
    import checkpoint
    checkpoint.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                     "optimizer": {}, "iter_num": 0, "best_val_loss": 9.9, "config": {},
                     "tokenizer": {"name": "char", "vocab_size": len(chars), "eot_id": None, "chars": chars}},
                    out_dir / "ckpt.pt")
    return str(out_dir)


def test_sample_py_uses_the_fast_path_on_cpu_and_says_so(trained, corpus, tmp_path, capsys):
    out_dir = save(trained, corpus[0], tmp_path)
    common = [f"--out_dir={out_dir}", "--prompt=ROMEO:", "--max_new_tokens=60", "--temperature=0", "--device=cpu"]
    sample.main(common + ["--fast_weights=float32"])
    fast = capsys.readouterr()
    assert "decoding: fast CPU path" in fast.err and "float32 weights (as requested)" in fast.err
    sample.main(common + ["--dtype=float32"])
    exact = capsys.readouterr()
    assert "decoding: model.generate_stream (exact" in exact.err
    assert fast.out == exact.out and fast.out.startswith("ROMEO:") and len(fast.out) > 60
    sample.main(common + ["--fast_weights=int8", "--num_samples=2", "--temperature=0.8"])
    int8 = capsys.readouterr()
    assert "int8 weights" in int8.err and int8.out.count("---------------") == 2


def tiny_model(seed: int) -> GPT:
    """A 1x16 model with every option, its weights away from the zero inits (untied head,
    bigram, value tables), so that every part counts."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=1, n_head=2, n_embd=16, **OPTIONS[-1])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One compiled step, shared by the tests below (the compiler takes a minute or more): for
    tiny_model's shape, in a cache folder of its own, built where a damaged package lay."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        decoder = FastDecoder(tiny_model(0), "float32")
        path = fast_decode.step_path(fast_decode.step_key(decoder.model, "float32", 1))
        path.parent.mkdir(parents=True)
        path.write_bytes(b"half a package")
        # other builds in the folder: one unused for over a month, one used 10 days ago
        old, recent = path.with_name("step-old.pt2"), path.with_name("step-recent.pt2")
        for other, days in ((old, hardware.CACHE_KEEP_DAYS + 1), (recent, 10)):
            other.write_bytes(b"another shape's step")
            os.utime(other, (time.time() - days * 86400,) * 2)
        lines = []
        how = decoder.compile_step(1, log=lines.append)
        yield {"decoder": decoder, "how": how, "lines": lines, "path": path, "cache": cache,
               "old": old, "recent": recent}


@pytest.mark.slow
def test_a_damaged_package_is_built_again_and_the_user_is_told(compiled):
    assert "stale or damaged" in compiled["lines"][0] and "compiling the decoding step" in compiled["lines"][1]
    assert "compiled in" in compiled["how"] and compiled["decoder"].compiled is not None
    assert compiled["path"].stat().st_size > 1000
    assert not list(compiled["path"].parent.glob("*.partial.pt2"))  # the build's temporary file is gone
    assert not compiled["old"].exists() and compiled["recent"].exists()  # a build prunes the month-old


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_text_and_serves_another_checkpoint(compiled, monkeypatch):
    """Greedy and seeded text of the compiled step equal the eager step's, past block_size (the
    window slides twice); a second checkpoint of the same shape loads the same package and
    computes with its own weights."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(compiled["cache"]))
    idx = torch.tensor([[3, 1, 4]])
    texts = []
    for decoder in (compiled["decoder"], FastDecoder(tiny_model(1), "float32")):
        if decoder.compiled is None:
            assert "loaded from" in decoder.compile_step(1, build=False)
        eager = FastDecoder(decoder.model, "float32")
        expected = eager.generate(idx, 40, temperature=0)
        assert torch.equal(decoder.generate(idx, 40, temperature=0), expected)
        seeded = [d.generate(idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
                  for d in (eager, decoder)]
        assert torch.equal(seeded[0], seeded[1])
        texts.append(expected)
    assert not torch.equal(texts[0], texts[1])  # each computed with its own weights


def test_a_compile_that_failed_is_remembered_and_tried_again_only_when_asked(tmp_path, monkeypatch):
    """No working compiler: the failure is kept beside where the step would be, so later runs
    decode eagerly at once (with one line) instead of failing for a minute again; --compile=true
    (retry) tries again, and a success forgets the failure."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def no_compiler(*args):
        builds.append(args)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(fast_decode, "build_step", no_compiler)
    decoder, lines = FastDecoder(tiny_model(2), "float32"), []
    assert decoder.compile_step(1, log=lines.append, retry=False) == "eager step (its compile failed)"
    assert decoder.compile_step(1, log=lines.append, retry=False) == "eager step (its compile failed before)"
    assert len(builds) == 1 and "failed to compile here before (RuntimeError: InvalidCxxCompiler" in lines[-1]
    decoder.compile_step(1, log=lines.append, retry=True)
    assert len(builds) == 2
    monkeypatch.setattr(fast_decode, "build_environment", lambda: {"python": "/new/venv", "compiler": "/usr/bin/g++"})
    decoder.compile_step(1, log=lines.append, retry=False)  # another environment since: tried again
    assert len(builds) == 3
    marker = next(tmp_path.rglob("*.failed"))

    def builds_then_mismatch(*args):  # the step builds, but its logits are off: the step's fault, not the machine's
        builds.append(args)
        raise AssertionError("the compiled step's logits differ")
    marker.unlink()
    monkeypatch.setattr(fast_decode, "build_step", builds_then_mismatch)
    decoder.compile_step(1, log=lines.append, retry=False)
    assert not list(tmp_path.rglob("*.failed"))  # nothing remembered: no reason to skip the next try


@pytest.mark.slow
def test_a_stale_package_is_not_used(compiled, monkeypatch):
    """A package at another key's path (here: batch 2's) is recognised by the key inside it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(compiled["cache"]))
    decoder = FastDecoder(compiled["decoder"].model, "float32")
    other = fast_decode.step_path(fast_decode.step_key(decoder.model, "float32", 2))
    other.write_bytes(compiled["path"].read_bytes())
    lines = []
    assert decoder.compile_step(2, build=False, log=lines.append).startswith("eager step")
    assert decoder.compiled is None and "built for another" in lines[0]


@pytest.mark.slow
def test_a_later_process_loads_the_package_without_compiling(compiled):
    """What sample.py does by default in a new process: the kept package is loaded, not built."""
    script = ("import sys; sys.path.insert(0, '.'); sys.path.insert(0, 'tests')\n"
              "import fast_decode, test_fast_decode\n"
              "model = test_fast_decode.tiny_model(2)\n"
              "decoder, how = fast_decode.decoder_for(model, 1, 'float32', new_tokens=1)\n"
              "print(how)\n")
    before = compiled["path"].stat()
    env = {**os.environ, "XDG_CACHE_HOME": str(compiled["cache"])}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "compiled step loaded from" in done.stdout and "compiling" not in done.stdout + done.stderr
    after = compiled["path"].stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)  # the same file, not rebuilt
    assert after.st_mtime_ns >= before.st_mtime_ns  # and marked used, so that pruning keeps it


def test_int8_weights_are_within_half_a_step_of_each_row_and_use_the_whole_range():
    """One scale per output row (the bf16 one the kernel reads): int8 * scale is within half a
    step of every weight, and each row's largest |w| maps to +-127, the full int8 range."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 48)[:, None])  # rows of very different sizes
    int8 = fast_decode.Int8Linear(linear)
    w, scales = linear.weight.detach(), int8.scales.float()
    assert int8.scales.shape == (48,) and int8.scales.dtype == torch.bfloat16
    assert (int8.weight.abs().amax(dim=1) >= 126).all()
    assert (w.abs() / scales[:, None] <= 127).all()  # the scale is rounded up: nothing is clipped
    error = (w - int8.weight.float() * scales[:, None]).abs()
    assert (error <= scales[:, None] * (0.5 + 1e-4)).all(), (error / scales[:, None]).max()


@pytest.mark.parametrize("int8_costs, chosen", [
    ([0.5] * 7, "int8"),  # twice as fast in every run
    ([0.95] * 7, "float32"),  # not 10% faster
    ([0.5] + [1.0] * 6, "float32"),  # faster in its best run only, not in the typical one
    ([1.0] * 6 + [0.5], "float32"),
    ([3.0] * 7, "float32"),  # slower
])
def test_choose_weights_takes_int8_only_when_it_is_10_percent_faster_in_median_and_best(monkeypatch, int8_costs,
                                                                                        chosen):
    """With a clock the products advance (float32: 1 s a run of all the blocks, int8: as given)."""
    import types
    model = small_model()
    runs_of = len(model.transformer.h) * 4  # products per timed run
    clock, calls = [0.0], {"int8": 0}

    def int8_forward(self, x, dtype=torch.float32):
        run = calls["int8"] // runs_of - 1  # the first run is the warm-up
        calls["int8"] += 1
        clock[0] += (int8_costs[run] if run >= 0 else 1.0) / runs_of
        return x

    def float_forward(self, x):
        clock[0] += 1.0 / runs_of
        return x

    monkeypatch.setattr(fast_decode, "int8_available", lambda: True)
    monkeypatch.setattr(fast_decode.Int8Linear, "forward", int8_forward)
    monkeypatch.setattr(torch.nn.Linear, "forward", float_forward)
    monkeypatch.setattr(fast_decode, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    weights, why = fast_decode.choose_weights(model, batch_size=1, repeats=7)
    assert weights == chosen, why
    if int8_costs == [0.5] + [1.0] * 6:  # the median says no, the best run yes: both are shown
        assert why.endswith(": 1000.000 ms int8 vs 1000.000 ms float32 for the 2 blocks' products at batch 1, "
                            "medians; best runs 500.000 vs 1000.000 ms)"), why


def test_a_generation_compiles_its_step_when_its_token_layers_pay(monkeypatch):
    """compile=None builds the step once max_new_tokens x n_layer reaches COMPILE_PAYS."""
    model = small_model()  # 2 layers
    builds = []
    monkeypatch.setattr(FastDecoder, "compile_step", lambda self, batch_size, build, log, retry: builds.append(build) or "")
    for new_tokens in (fast_decode.COMPILE_PAYS // 2 - 1, fast_decode.COMPILE_PAYS // 2):
        decoder_for(model, 1, "float32", None, new_tokens=new_tokens)
    assert builds == [False, True]


def test_a_model_not_in_float32_is_not_supported_and_decodes_on_the_plain_path():
    model = small_model().to(torch.bfloat16)
    assert supported(model) == "the model's weights are not float32"
    decoder, how = decoder_for(model, 1, "float32", False)
    assert decoder is model and "not float32" in how


def test_with_both_formats_compiled_the_kept_timing_decides(tmp_path, monkeypatch):
    """Two kept compiled steps do not decide between themselves: the timed choice does, as it
    would without them, so a seed gives one text."""
    if not fast_decode.int8_available():
        pytest.skip("no int8 kernel in this torch build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = small_model()
    for weights in ("float32", "int8"):
        path = fast_decode.step_path(fast_decode.step_key(model, weights, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a package")
    monkeypatch.setattr(fast_decode, "choose_weights", lambda model, batch_size: ("float32", "timed"))
    assert fast_decode.auto_weights(model, 1, None) == ("float32", "timed")


def test_a_model_the_fast_path_does_not_compute_decodes_on_the_plain_path_and_says_where_to_look():
    """A model whose own forward differs from what the fast step computes (here its logits
    doubled, as an option added to model.py but not to the fast path would): the plain path,
    with a reason that names the model's options and where a new one is declared."""
    doubled = DoubledLogits(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, rotary=True)).eval()
    decoder, why = fast_decode.decoder_for(doubled, 1, "float32", compile=False)
    assert decoder is doubled
    assert "an option it does not compute? this model's options: rotary" in why
    assert "fast_decode.NOT_IMPLEMENTED" in why
