"""Direct tests of promises that whole-run tests cannot see: the training step clips and
averages as it says, the sampler draws exactly from the tokens top-k / top-p leave, the int8
weights stay within half a quantization step, and every sampling setting reaches the sampler
through every path a user takes (sample.py one-shot and interactive, app.py and its API; the
fast CPU path and the plain one)."""
import copy
import dataclasses
import inspect
import contextlib
import math
import io
import socket
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import app
import checkpoint
import fast_decode
import hardware
import model as model_module
import sample
from errors import UserError
from generation import GenerationConfig
from loading import choose_precision
from model import GPT, GPTConfig, sample_next
from training import TrainConfig, get_lr, get_muon_momentum, set_schedule, train_step

FLOAT32 = hardware.Precision("cpu", "float32", "float32 on cpu (test)")
VOCAB = 11


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=8, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def batch(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (rows, 8), generator=g)
    y = torch.randint(0, VOCAB, (rows, 8), generator=g)
    return x, y


def sgd_step(model, batches, grad_clip, lr=1.0):
    """train_step with plain SGD (no momentum, no decay): the update is -lr times the applied
    gradient. Returns (the applied gradient per parameter, train_step's grad norm)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    _, grad_norm = train_step(model, optimizer, scaler, batches, FLOAT32, grad_clip)
    applied = [(b - p.detach()) / lr for b, p in zip(before, model.parameters())]
    return applied, grad_norm


def raw_gradient(model, x, y):
    """The gradient of the mean loss over (x, y), computed on a copy without train_step."""
    twin = copy.deepcopy(model)
    twin(x, y)[1].backward()
    return [p.grad.detach().clone() for p in twin.parameters()]


def total_norm(tensors) -> float:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


# ---------------------------------------------------------------------------- the training step

def test_a_clipped_step_applies_a_gradient_of_norm_grad_clip_in_the_raw_direction():
    model = tiny_gpt()
    x, y = batch(4)
    raw = raw_gradient(model, x, y)
    raw_norm = total_norm(raw)
    grad_clip = raw_norm / 4  # clipping must act
    applied, grad_norm = sgd_step(model, [(x, y)], grad_clip)
    assert grad_norm.item() == pytest.approx(raw_norm, rel=1e-4)  # the norm before clipping is reported
    assert total_norm(applied) <= grad_clip * (1 + 1e-4)
    assert total_norm(applied) == pytest.approx(grad_clip, rel=1e-3)  # scaled down, not zeroed
    for a, r in zip(applied, raw):  # the same direction: every element scaled by grad_clip / norm
        torch.testing.assert_close(a, r * (grad_clip / raw_norm), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("grad_clip", [0.0, 1e6])  # off, and a bound the gradient stays under
def test_an_unclipped_step_applies_the_raw_gradient(grad_clip):
    model = tiny_gpt()
    x, y = batch(4)
    raw = raw_gradient(model, x, y)
    applied, grad_norm = sgd_step(model, [(x, y)], grad_clip)
    assert grad_norm.item() == pytest.approx(total_norm(raw), rel=1e-4)
    for a, r in zip(applied, raw):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_two_micro_batches_make_the_same_step_as_one_batch_of_both(grad_clip):
    """Gradient accumulation averages: the loss is a mean over tokens, so two equal halves
    must give the gradient of the whole batch (not twice it). Without clipping the step shows
    the size of the gradient; with it, the reported norm does."""
    x, y = batch(4)
    one, two = tiny_gpt(), tiny_gpt()
    applied_one, norm_one = sgd_step(one, [(x, y)], grad_clip)
    applied_two, norm_two = sgd_step(two, [(x[:2], y[:2]), (x[2:], y[2:])], grad_clip)
    assert total_norm(applied_one) > 0
    assert norm_two.item() == pytest.approx(norm_one.item(), rel=1e-4)
    for a, b in zip(applied_one, applied_two):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_a_document_batch_steps_with_its_positions():
    """A micro-batch (x, y, positions) of documents mode trains with its positions (attention
    within each document, positions restarting), as the model computes them."""
    model = tiny_gpt()
    x, y = batch(2)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 1]])
    twin = copy.deepcopy(model)
    twin(x, y, positions=positions)[1].backward()
    applied, _ = sgd_step(model, [(x, y, positions)], 0.0)
    for a, p in zip(applied, twin.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-6)


def test_under_ddp_gradients_are_reduced_once_per_step_on_the_last_micro_batch(tmp_path):
    """DDP's no_sync on every micro-step but the last: one all-reduce per bucket per step (a
    real gloo group of one process; a communication hook counts the reductions)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DDP(tiny_gpt())
        reduced = []

        def count(state, bucket):
            reduced.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        ddp.register_comm_hook(None, count)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        x, y = batch(6)
        micro = [(x[i:i + 2], y[i:i + 2]) for i in (0, 2, 4)]
        train_step(ddp, optimizer, scaler, micro[:1], FLOAT32, 1.0, ddp=True)
        per_step = len(reduced)
        assert per_step > 0
        reduced.clear()
        train_step(ddp, optimizer, scaler, micro, FLOAT32, 1.0, ddp=True)
        assert len(reduced) == per_step  # three micro-batches, still one reduction per bucket
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- the schedule

def test_warmup_rises_linearly_and_decays_reach_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert [get_lr(it, cfg) for it in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert get_lr(10, cfg) == pytest.approx(1.0)  # the end of the warmup is the peak
    assert get_lr(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # cosine, a quarter in
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)
    assert get_lr(50, dataclasses.replace(cfg, decay_lr=False)) == 1.0


def test_wsd_holds_the_rate_then_falls_linearly_over_the_warmdown():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200,
                      lr_schedule="wsd", warmdown_frac=0.2)  # the warmdown: iterations 88 to 110
    assert get_lr(5, cfg) == pytest.approx(6 / 11)  # the same warmup
    assert get_lr(10, cfg) == get_lr(50, cfg) == get_lr(88, cfg) == pytest.approx(1.0)  # stable
    assert get_lr(99, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(111, cfg) == pytest.approx(0.1)
    assert get_lr(50, dataclasses.replace(cfg, warmdown_frac=0.0)) == pytest.approx(1.0)  # no warmdown: stable
    one = dataclasses.replace(cfg, lr_schedule="cosine", lr_decay_iters=11)  # a decay of one iteration
    assert get_lr(11, one) == pytest.approx(0.1)
    short = dataclasses.replace(cfg, warmdown_frac=0.005)  # a warmdown shorter than one iteration
    assert get_lr(109, short) == pytest.approx(1.0) and get_lr(110, short) == pytest.approx(0.1)


def test_muon_momentum_warms_up_from_085_to_095_and_each_group_gets_its_rate():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200,
                      optimizer="muon", muon_momentum_warmup=20)
    assert [get_muon_momentum(it, cfg) for it in (0, 10, 20, 100)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert get_muon_momentum(0, dataclasses.replace(cfg, muon_momentum_warmup=0)) == 0.95
    model = tiny_gpt()
    optimizer = model.configure_optimizer(0.1, 1.0, (0.9, 0.95), "cpu", name="muon", embed_lr_scale=3.0)
    assert set_schedule(optimizer, 4, cfg) == pytest.approx(5 / 11)
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    assert 3.0 in scales  # the embeddings' group
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5 / 11 * k for k in scales])
    assert [g["momentum"] for g in optimizer.muon.param_groups] == pytest.approx([0.87])


# ---------------------------------------------------------------------------- sampling

# fixed probabilities, in a shuffled order so that sorting and scattering back are exercised
PROBS = {3: 0.40, 0: 0.25, 4: 0.20, 1: 0.10, 2: 0.05}  # token -> probability
ROWS = 4000  # draws per call: a token of renormalized probability >= 0.05 shows up (1 - 0.95^4000)


def draws_logits() -> torch.Tensor:
    """(ROWS, vocab): every row the log of PROBS, shifted (a shift changes nothing)."""
    probs = torch.tensor([PROBS[t] for t in range(len(PROBS))])
    return probs.log().expand(ROWS, -1) + 3.0


def draws(temperature=1.0, **settings) -> torch.Tensor:
    """ROWS draws (one per row) from the fixed distribution."""
    return sample_next(draws_logits(), temperature, generator=torch.Generator().manual_seed(0), **settings)


def drawn(**settings) -> set[int]:
    return set(draws(**settings).tolist())


def test_top_k_draws_exactly_from_the_k_most_likely():
    assert drawn(top_k=1) == {3}
    assert drawn(top_k=2) == {3, 0}
    assert drawn(top_k=4) == {3, 0, 4, 1}
    assert drawn(top_k=5) == drawn(top_k=99) == drawn(top_k=None) == drawn(top_k=0) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_token_that_crosses_p():
    """The nucleus is the smallest set whose probability reaches p: the most likely tokens up
    to and including the one whose cumulative probability first reaches p."""
    # cumulative: 0.40, 0.65, 0.85, 0.95, 1.00 (p values sit away from them: float rounding)
    assert drawn(top_p=0.01) == drawn(top_p=0.39) == {3}
    assert drawn(top_p=0.41) == drawn(top_p=0.64) == {3, 0}
    assert drawn(top_p=0.66) == drawn(top_p=0.84) == {3, 0, 4}
    assert drawn(top_p=0.86) == drawn(top_p=0.94) == {3, 0, 4, 1}
    assert drawn(top_p=0.96) == drawn(top_p=1.0) == {0, 1, 2, 3, 4}


def test_top_p_at_exactly_the_cumulative_probability_keeps_no_more():
    """Four equal logits: probabilities 0.25 each, cumulative 0.25, 0.5, 0.75, 1 exactly in
    float32. "Reaches p" includes equality: p = 0.5 keeps two tokens, not three."""
    logits = torch.zeros(ROWS, 4)
    for p, kept in ((0.25, 1), (0.5, 2), (0.75, 3), (0.7501, 4)):
        ids = sample_next(logits, 1.0, top_p=p, generator=torch.Generator().manual_seed(0))
        assert len(set(ids.tolist())) == kept, p


def test_top_k_and_top_p_together_keep_the_smaller_set():
    assert drawn(top_k=2, top_p=0.9) == {3, 0}
    assert drawn(top_k=4, top_p=0.5) == {3, 0}


def frequencies(ids: torch.Tensor) -> torch.Tensor:
    return torch.bincount(ids, minlength=len(PROBS)).float() / len(ids)


def test_kept_tokens_are_drawn_in_proportion_and_temperature_sharpens():
    """Within the nucleus the draws follow the renormalized probabilities; temperature T
    draws from p^(1/T), renormalized. Tolerances are ~5 standard errors at 4000 draws."""
    probs = torch.tensor([PROBS[t] for t in range(len(PROBS))])
    nucleus = torch.zeros_like(probs)
    nucleus[[3, 0, 4]] = probs[[3, 0, 4]]
    torch.testing.assert_close(frequencies(draws(top_p=0.8)), nucleus / nucleus.sum(), atol=0.04, rtol=0)
    for t in (0.5, 1.0, 2.0):
        expected = probs ** (1 / t) / (probs ** (1 / t)).sum()
        torch.testing.assert_close(frequencies(draws(temperature=t)), expected, atol=0.04, rtol=0)
    assert drawn(temperature=0) == {3}
    unset = sample_next(draws_logits(), generator=torch.Generator().manual_seed(0))  # temperature's default
    torch.testing.assert_close(frequencies(unset), probs, atol=0.04, rtol=0)


def test_a_tiny_temperature_is_greedy_in_every_row():
    """Each row's best logit is shifted to 0 before dividing: with a temperature whose
    reciprocal overflows float32, the others become -inf, never inf - inf = nan, whatever
    the row's own scale."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1], [10], [1e-3], [3], [100], [0.1]])
    for t in (1e-30, 1e-45):
        assert torch.equal(sample_next(logits, temperature=t), logits.argmax(dim=-1))


def test_min_p_keeps_the_tokens_at_least_min_p_times_the_best():
    if "min_p" not in inspect.signature(sample_next).parameters:
        pytest.skip("sample_next has no min_p")
    # the best is 0.40: min_p 0.3 keeps p >= 0.12 (3, 0, 4), 0.2 keeps p >= 0.08 (and 1)
    assert drawn(min_p=0.3) == {3, 0, 4}
    assert drawn(min_p=0.2) == {3, 0, 4, 1}
    assert drawn(min_p=0.9) == {3}
    assert drawn(min_p=0.0) == {0, 1, 2, 3, 4}


# ---------------------------------------------------------------------------- int8 weights

@pytest.mark.parametrize("shape", [(96, 64), (384, 128)])
def test_int8_weights_are_within_half_a_step_of_the_float_weights(shape):
    """Int8Linear's promise, element by element: W ~= int8 * scale, one scale per output row,
    the scale that maps the row's largest |w| to 127 (as stored, in bf16, never below it)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight[5] *= 1e-3  # rows of very different sizes each get their own scale
        linear.weight[7] *= 50
    q = fast_decode.Int8Linear(linear)
    w = linear.weight.detach()
    assert q.weight.dtype == torch.int8 and q.scales.shape == (shape[0],)
    step = q.scales.float()  # (out,)
    exact = w.abs().amax(dim=1) / 127
    assert (step >= exact).all() and (step <= exact * (1 + 2 ** -7)).all()  # within one bf16 rounding
    assert (q.weight.abs().amax(dim=1) >= 126).all()  # every row uses the int8 range (127 / (1 + 2^-7) > 126)
    error = (q.weight.float() * step[:, None] - w).abs()
    assert (error <= step[:, None] / 2 * (1 + 1e-5)).all(), (error / step[:, None]).max()


# ---------------------------------------------------------------------------- settings reach the sampler

CHARS = sorted(set("\n !,.:;?abcdefghijklmnopqrstuvwxyzAEMOR"))
SETTINGS = [  # two settings that differ in every field; top_k 0 means off, which the sampler sees as None
    dict(temperature=0.5, top_k=7, top_p=0.9, seed=5, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=1.0, top_k=0, top_p=1.0, seed=6, min_p=0.0, repetition_penalty=1.0),
]


def seen_by_sampler(settings: dict) -> dict:
    """What sample_next must receive for these settings."""
    return dict(temperature=settings["temperature"], top_k=settings["top_k"] or None,
                top_p=settings["top_p"], seed=settings["seed"], min_p=settings["min_p"],
                repetition_penalty=settings["repetition_penalty"])


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> Path:
    """A checkpoint of a tiny random char-level GPT (fast_decode supports its architecture)."""
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    out = tmp_path_factory.mktemp("promises")
    checkpoint.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "optimizer": {},
                     "iter_num": 0, "best_val_loss": 9.9, "config": {},
                     "tokenizer": {"name": "char", "vocab_size": len(CHARS), "eot_id": None, "chars": CHARS}},
                    out / "ckpt.pt")
    return out


@pytest.fixture
def sampler_calls(monkeypatch) -> list[dict]:
    """Every call of the real model.sample_next, which every decoder's loop (model.slide_window)
    calls: which path computed the logits (fast_decode's FastDecoder or the model's own forward),
    whether the loop holds a KV cache, and the settings the sampler received."""
    calls = []
    real = model_module.sample_next
    signature = inspect.signature(real)

    def sample_next_spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        generator = given.pop("generator")
        given.pop("logits")
        loop = inspect.currentframe().f_back.f_locals  # model.slide_window's
        next_logits = loop.get("next_logits")
        path = "fast" if isinstance(getattr(next_logits, "__self__", None), fast_decode.FastDecoder) else "plain"
        calls.append({"path": path, "cached": loop.get("cache") is not None, **given,
                      "seed": None if generator is None else generator.initial_seed()})
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "sample_next", sample_next_spy)
    return calls


def assert_every_call(calls: list[dict], path: str, settings: dict, cached: bool = True):
    assert calls, "the sampler was never called"
    expected = {"path": path, "cached": cached, **seen_by_sampler(settings)}
    for call in calls:
        assert {k: call.get(k) for k in expected} == expected


def sample_flags(char_dir, settings, *extra) -> list[str]:
    return [f"--out_dir={char_dir}", "--device=cpu", "--max_new_tokens=3", *extra,
            *(f"--{k}={v}" for k, v in settings.items())]


# the fast path (dtype auto on a cpu), the plain one (dtype float32), and the fast decoder
# without its cache (the model's own loop)
PATHS = [("fast", ["--dtype=auto", "--fast_weights=float32"]), ("plain", ["--dtype=float32"]),
         ("plain", ["--dtype=auto", "--fast_weights=float32", "--use_cache=false"])]


@pytest.mark.parametrize("path,flags", PATHS)
def test_sample_py_one_shot_passes_every_setting_to_the_sampler(char_dir, sampler_calls, capsys, path, flags):
    for settings in SETTINGS:
        sampler_calls.clear()
        sample.main(sample_flags(char_dir, settings, "--prompt=ab", *flags))
        assert_every_call(sampler_calls, path, settings, cached="--use_cache=false" not in flags)
        assert len(sampler_calls) == 3
    capsys.readouterr()


@pytest.mark.parametrize("path,flags", PATHS[:2])
def test_sample_py_interactive_passes_every_setting_to_the_sampler(char_dir, sampler_calls, capsys, monkeypatch,
                                                                   path, flags):
    for settings in SETTINGS:
        sampler_calls.clear()
        monkeypatch.setattr(sys, "stdin", io.StringIO("ab\nba\nquit\n"))
        sample.main(sample_flags(char_dir, settings, "--interactive", *flags))
        assert_every_call(sampler_calls, path, settings)
        assert len(sampler_calls) == 6  # two lines, three tokens each
    assert capsys.readouterr().out.count(">> ") == 6


@pytest.mark.parametrize("path,dtype", [("fast", "auto"), ("plain", "float32")])
def test_app_generate_passes_every_setting_to_the_sampler(char_dir, sampler_calls, path, dtype):
    precision = choose_precision("cpu", dtype)
    models = app.Models({"m": char_dir}, precision, dtype)
    for settings in SETTINGS:
        sampler_calls.clear()
        s = settings
        texts = list(app.generate(models, 100, 0.0, "ab", 3, s["temperature"], s["top_k"], s["top_p"], s["seed"],
                                  None, s["min_p"], s["repetition_penalty"]))
        assert len(texts[-1]) == 2 + 3
        assert_every_call(sampler_calls, path, settings)


def test_app_api_passes_every_setting_to_the_sampler(char_dir, sampler_calls, tmp_path):
    """The /generate endpoint's parameters, in the documented order, through a real server
    (in this process, so the spy sees its calls) and gradio_client."""
    gradio_client = pytest.importorskip("gradio_client", reason="pip install -r requirements-extras.txt")
    gr = app.import_gradio()
    models = app.Models({"m": char_dir}, choose_precision("cpu", "auto"), "auto")
    demo = app.build_demo(gr, models, 100, 0.0, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        for settings in SETTINGS:
            sampler_calls.clear()
            s = settings
            text = client.predict("ab", 3, s["temperature"], s["top_k"], s["top_p"], s["seed"], "m",
                                  s["min_p"], s["repetition_penalty"], api_name="/generate")
            assert len(text) == 2 + 3
            assert_every_call(sampler_calls, "fast", settings)
        # each parameter is fed by the page's box of that name, which starts at sample.py's default
        parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
        names = [p["parameter_name"] for p in parameters["parameters"]]
        assert names == ["prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "model", "min_p",
                         "repetition_penalty"]
        defaults = GenerationConfig()
        for p in parameters["parameters"]:
            name = p["parameter_name"]
            assert p["label"].lower().replace("-", " ").startswith(name.replace("_", " ")), p
            if name in ("temperature", "top_k", "top_p", "seed", "min_p", "repetition_penalty"):
                assert p["parameter_default"] == getattr(defaults, name), p
    finally:
        demo.close()


# ---------------------------------------------------------------------------- stopping

def run_rows(stop, rows: list[list[int]]) -> list[str]:
    """Feed rows of ids (of one length) step by step; the final texts."""
    for step in range(len(rows[0])):
        stop.update([r[step] for r in rows])
    stop.finish()
    return [stop.text(b) for b in range(len(rows))]


def test_a_documents_model_ends_at_its_boundary_and_a_plain_gpt2_goes_on():
    from stopping import StopCondition
    from tokenizer import Tokenizer
    docs = Tokenizer.char_from_text("ab", documents="line")
    a, b, eot = docs.encode("a")[0], docs.encode("b")[0], docs.eot_id
    stop = StopCondition.for_model(docs, 2)
    assert run_rows(stop, [[a, eot, b, b], [b, b, a, eot]]) == ["a", "bba"]
    assert stop.steps == 4  # one update per generated token
    try:
        gpt2 = Tokenizer.tiktoken("gpt2")
    except UserError as e:  # no tiktoken cache offline
        pytest.skip(str(e))
    ids = gpt2.encode("Hi") + [gpt2.eot_id] + gpt2.encode(" there")
    assert run_rows(StopCondition.for_model(gpt2, 1), [ids]) == ["Hi<|endoftext|> there"]
    assert run_rows(StopCondition.for_model(gpt2, 1, ["<|end"]), [ids]) == ["Hi"]


def test_bytes_that_are_not_utf8_become_replacement_characters():
    """A BPE model can emit any byte sequence: it prints U+FFFD, never raises."""
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)])  # one token per byte
    ids = [0xC3, 0x41, 0xFF, 0xE2, 0x82]  # a cut 2-byte char, 'A', a byte never in UTF-8, a cut 3-byte char
    assert run_rows(StopCondition.for_model(tok, 1), [ids]) == ["\ufffdA\ufffd\ufffd"]


def test_streaming_holds_back_only_what_could_start_a_stop_string():
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.char_from_text("abxEND")
    stop = StopCondition.for_model(tok, 1, ["END", "xx"])
    shown = []
    for c in "abxEN":
        stop.update(tok.encode(c))
        shown.append(stop.new_text(0))
    assert shown == ["a", "b", "", "x", ""]  # "x" could start "xx", "E" and "EN" could start "END"
    stop.update(tok.encode("D"))
    assert stop.all_done and stop.new_text(0) == "" and stop.text(0) == "abx"


def test_padding_ids_are_skipped_without_touching_the_other_rows():
    """A model's vocabulary may be padded past the tokenizer's (GPT-2's 50257 to 50304): such
    an id is no text, and the other rows of that step go on."""
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.char_from_text("ab")
    a, b, pad = tok.encode("a")[0], tok.encode("b")[0], tok.vocab_size
    assert run_rows(StopCondition.for_model(tok, 2), [[pad, a, pad + 5], [a, b, b]]) == ["a", "abb"]


def test_a_sample_ends_at_the_first_stop_string_even_at_its_start_or_twice_in_one_token():
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.char_from_text("abc")
    assert run_rows(StopCondition.for_model(tok, 1, ["ab"]), [tok.encode("abcab")]) == [""]
    try:
        gpt2 = Tokenizer.tiktoken("gpt2")
    except UserError as e:  # no tiktoken cache offline
        pytest.skip(str(e))
    ids = gpt2.encode("a----b")
    assert gpt2.decode(ids[1:2]) == "----"  # one token holds the stop string twice
    assert run_rows(StopCondition.for_model(gpt2, 1, ["--"]), [ids]) == ["a"]



def streamed_and_final(stop, ids) -> tuple[str, str]:
    """Row 0's text as new_text() streamed it (after each id and after finish), and its final text."""
    shown = ""
    for i in ids:
        stop.update([i])
        shown += stop.new_text(0)
    stop.finish()
    return shown + stop.new_text(0), stop.text(0)


@pytest.mark.parametrize("stops, text, final", [(["aab"], "xaab", "x"), (["aab"], "xaac", "xaac"),
                                                 (["abcdef"], "abcdef", ""), (["abcdef"], "abcx", "abcx"),
                                                 (["END", "xx"], "abxENxD", "abxENxD")])
def test_streamed_text_is_exactly_the_final_text(stops, text, final):
    """What streaming hands out is never taken back: it is always the final text, however long
    the stop string is and however many of its prefixes end the text so far."""
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.char_from_text("abcdefxEND")
    assert streamed_and_final(StopCondition.for_model(tok, 1, stops), tok.encode(text)) == (final, final)


def test_empty_stop_strings_are_ignored_and_one_token_holding_two_stops_ends_at_the_first():
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.char_from_text("ab")
    assert run_rows(StopCondition.for_model(tok, 1, ["", "zz"]), [tok.encode("abba")]) == ["abba"]
    pairs = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)] + [b"xy"])  # "xy" is one token
    assert pairs.encode("xy") == [256]
    assert run_rows(StopCondition.for_model(pairs, 1, ["y", "x"]), [[256]]) == [""]



def test_a_stop_string_completed_by_the_last_partial_character_still_ends_the_sample():
    """The decoder's final flush (a cut character becomes U+FFFD) can complete a stop string too."""
    from stopping import StopCondition
    from tokenizer import Tokenizer
    tok = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)])  # one token per byte
    assert run_rows(StopCondition.for_model(tok, 1, ["A\ufffd"]), [[0x41, 0xC3]]) == [""]

def test_all_done_only_once_every_row_has_ended():
    from stopping import StopCondition
    from tokenizer import Tokenizer
    docs = Tokenizer.char_from_text("ab", documents="line")
    a, eot = docs.encode("a")[0], docs.eot_id
    stop = StopCondition.for_model(docs, 2)
    assert stop.update([eot, a]) is False and not stop.all_done
    assert stop.update([a, eot]) is True and stop.all_done
    assert [stop.text(0), stop.text(1)] == ["", "a"]


def test_a_gpt2_documents_models_boundary_token_is_never_text():
    from stopping import StopCondition
    from tokenizer import Tokenizer
    try:
        gpt2 = Tokenizer.tiktoken("gpt2")
    except UserError as e:  # no tiktoken cache offline
        pytest.skip(str(e))
    gpt2.documents = "line"
    ids = gpt2.encode("Hi") + [gpt2.eot_id] + gpt2.encode(" there")
    stop = StopCondition.for_model(gpt2, 1)
    assert streamed_and_final(stop, ids) == ("Hi", "Hi")


# ---------------------------------------------------------------------------- checkpoint files

def plain_checkpoint(**more) -> dict:
    return {"model": {"w": torch.ones(3)}, "model_args": {}, "iter_num": 7, "config": {}, "tokenizer": {}, **more}


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past limit bytes fail (EFBIG) in this process, as on a full disk (Unix)."""
    resource = pytest.importorskip("resource")
    import signal
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_checkpoint_is_saved_into_new_folders_and_loads_from_its_folder(tmp_path):
    folder = tmp_path / "runs" / "a"  # neither folder exists yet
    checkpoint.save(plain_checkpoint(), folder / "ckpt.pt")
    loaded = checkpoint.load(folder)  # a folder stands for its ckpt.pt
    assert (loaded["format"], loaded["version"], loaded["iter_num"]) == (checkpoint.FORMAT, checkpoint.VERSION, 7)
    assert loaded["model"]["w"].device.type == "cpu"
    assert checkpoint.load(folder, map_location="meta")["model"]["w"].is_meta  # map_location reaches torch.load


def test_a_failed_save_says_why_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    blocked = tmp_path / "file" / "out" / "ckpt.pt"
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(UserError) as e:
        checkpoint.save(plain_checkpoint(), blocked)
    assert str(e.value) == (f"could not write checkpoint {blocked}: Not a directory. Free some disk space "
                            f"or choose another --out_dir.")  # no previous checkpoint: none is promised
    path = tmp_path / "ckpt.pt"
    checkpoint.save(plain_checkpoint(), path)
    with file_size_limit(4096), pytest.raises(UserError) as e:
        checkpoint.save(plain_checkpoint(model={"w": torch.zeros(10_000)}), path)
    message = str(e.value)
    assert message.startswith(f"could not write checkpoint {path}: the write stopped short ([enforce fail")  # torch's RuntimeError, first line
    assert message.endswith(". Free some disk space or choose another --out_dir. The previous checkpoint is unchanged.")
    assert "\n" not in message
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))


def test_a_newer_version_or_missing_entries_are_refused_by_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    plain = {"format": checkpoint.FORMAT, **plain_checkpoint()}
    torch.save(plain, path)  # no version: written before versions were recorded, read as version 0
    assert checkpoint.load(path)["iter_num"] == 7
    torch.save({**plain, "version": checkpoint.VERSION + 1}, path)
    with pytest.raises(UserError, match=rf"has checkpoint version {checkpoint.VERSION + 1}, newer than this code "
                                        rf"reads \({checkpoint.VERSION}\); update the code"):
        checkpoint.load(path)
    torch.save({k: v for k, v in plain.items() if k not in ("model", "tokenizer")}, path)
    with pytest.raises(UserError, match="is missing model, tokenizer; it is incomplete"):
        checkpoint.load(path)


def test_an_unreadable_checkpoint_says_what_the_loader_found(tmp_path):
    path = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(path, "w") as z:  # a zip archive, but not torch's layout
        z.writestr("archive/notes.txt", "no data.pkl here")
    with pytest.raises(RuntimeError) as found:
        torch.load(path, weights_only=True)
    with pytest.raises(UserError) as e:
        checkpoint.load(path)
    assert (f"is truncated or corrupted (not a readable checkpoint: {str(found.value).splitlines()[0].split('. ')[0]}); "
            f"restore it") in str(e.value)
    path.write_bytes(b"\x88")  # one opcode, then the end: an EOFError without a message names its type
    with pytest.raises(UserError, match=r"is truncated or corrupted \(not a readable checkpoint: EOFError\); "
                                        r"restore it"):
        checkpoint.load(path)
    path.write_bytes(b"hello, not a checkpoint\n")  # torch's own message is a bare number: the kind too
    with pytest.raises(UserError, match=r"\(not a readable checkpoint: KeyError: 101\); restore it"):
        checkpoint.load(path)


def test_a_save_that_fails_without_an_os_reason_still_says_why(tmp_path, monkeypatch):
    """An OSError with no strerror (a filesystem library's own words) is quoted, never 'None'."""
    def refuse(obj, f):
        raise OSError("quota exceeded on the share")

    monkeypatch.setattr(checkpoint.torch, "save", refuse)
    with pytest.raises(UserError) as e:
        checkpoint.save(plain_checkpoint(), tmp_path / "ckpt.pt")
    assert "None" not in str(e.value)
    assert str(e.value).startswith(f"could not write checkpoint {tmp_path / 'ckpt.pt'}: the write stopped short "
                                   f"(quota exceeded on the share).")


def test_a_checkpoint_that_is_not_a_dict_or_lacks_model_args_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save([1, 2, 3], path)  # torch.save of something else entirely
    with pytest.raises(UserError, match="is not a checkpoint of this project"):
        checkpoint.load(path)
    torch.save({k: v for k, v in {"format": checkpoint.FORMAT, **plain_checkpoint()}.items() if k != "model_args"},
               path)
    with pytest.raises(UserError, match="is missing model_args; it is incomplete"):
        checkpoint.load(path)


def test_a_checkpoint_in_torchs_older_non_zip_format_loads(tmp_path):
    """No zip, so no CRC-32s to check: torch.load judges it, and a good one loads."""
    path = tmp_path / "ckpt.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, **plain_checkpoint()}, path,
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert checkpoint.load(path)["iter_num"] == 7


def test_a_checkpoint_replaced_while_it_is_opened_is_read_whole_from_one_file(tmp_path, monkeypatch):
    """A save may rename a new file over ckpt.pt between load's two opens: both handles must be
    on one file (the checksums checked are those of the bytes read), so it opens again; a file
    replaced at every attempt is refused in one line rather than read from two files."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save(plain_checkpoint(iter_num=1), path)
    real_open, opens = open, []

    def open_then_replace(file, *args, replace_times, **kwargs):
        handle = real_open(file, *args, **kwargs)
        opens.append(file)
        if len(opens) % 2 == 1 and len(opens) // 2 < replace_times:  # a save lands between the pair's opens
            checkpoint.save(plain_checkpoint(iter_num=len(opens) + 1), path)
        return handle

    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: open_then_replace(*a, replace_times=1, **k), raising=False)
    assert checkpoint.load(path)["iter_num"] == 2  # the second pair: both on the file saved by then
    assert len(opens) == 4
    opens.clear()
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: open_then_replace(*a, replace_times=99, **k), raising=False)
    with pytest.raises(UserError, match="keeps being replaced as it is read"):
        checkpoint.load(path)
