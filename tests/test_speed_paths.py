"""The CPU speed paths of model.py behave like the plain ones: dropout drops what it should,
deterministically under torch.manual_seed, and the chunked attention dropout equals a naive
attention applying the same mask, forward and backward. Also: bench.py runs."""
import math
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
import hardware
from cpu_kernels import Dropout, _CPUAttention, _dropped_causal, causal_attention
from model import GPT, GPTConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_dropout_rate_and_scale():
    torch.manual_seed(0)
    p, n = 0.2, 400_000
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(n, dtype=dtype)
        y = Dropout(p).train()(x)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 0.005  # ~8 standard deviations
        survivors = y[y != 0].float()
        assert torch.allclose(survivors, torch.full_like(survivors, 1 / (1 - p)), rtol=1e-2)
        assert abs(y.float().mean().item() - 1.0) < 0.01  # unbiased


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_survivors_and_their_gradient_are_one_multiply_by_the_scale(dtype):
    torch.manual_seed(0)
    x = torch.randn(5000, dtype=dtype, requires_grad=True)
    y = Dropout(0.2).train()(x)
    scale = torch.tensor(cpu_kernels._drop_threshold(0.2)[1], dtype=dtype)  # 1/(1-p), in x's dtype
    kept = y != 0
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.equal(grad[kept], g[kept] * scale) and not grad[~kept].any()


def test_dropout_is_deterministic_under_the_global_seed():
    x = torch.randn(64, 33)
    drop = Dropout(0.3).train()
    torch.manual_seed(7)
    a = drop(x)
    state = torch.get_rng_state()
    b = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), a)
    torch.set_rng_state(state)
    assert torch.equal(drop(x), b)
    assert not torch.equal(a, b)


def test_dropout_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(1000, requires_grad=True)
    y = Dropout(0.5).train()(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g == 0, y == 0)
    assert torch.allclose(g[g != 0], torch.tensor(2.0))


def test_dropout_zero_and_eval_are_the_identity():
    x = torch.randn(8, 8)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(0.5).eval()(x), x)


def naive_attention(q, k, v, drop, keep_scale):
    """Causal softmax attention, probabilities zeroed where drop is True and scaled."""
    T = q.size(-2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return (probs.masked_fill(drop, 0) * keep_scale) @ v


@pytest.mark.parametrize("p", [0.3, 0.0])  # bf16 training takes this path without dropout too
@pytest.mark.parametrize("T", [9, 10])  # odd T draws the full square mask, even T the causal half
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_attention_dropout_equals_naive_attention_with_the_same_mask(dtype, tol, T, p):
    torch.manual_seed(0)
    B, nh, hs = 2, 3, 8
    q, k, v = (torch.randn(B, nh, T, hs, dtype=dtype, requires_grad=True) for _ in range(3))
    torch.manual_seed(3)
    # training takes our kernel with dropout or in bf16; float32 without dropout would take
    # torch's SDPA, so those cases call the kernel itself
    y = causal_attention(q, k, v, p) if p > 0 or dtype == torch.bfloat16 else _CPUAttention.apply(q, k, v, p)
    assert y.grad_fn.name() == "_CPUAttentionBackward"
    torch.manual_seed(3)  # the same draw gives the mask the fast path used
    drop, keep_scale = _dropped_causal(B, nh, T, p)
    assert drop[..., 0, 0].any() == (p > 0)  # some first rows keep nothing: their output must be 0
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_inputs, drop, keep_scale)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (q, k, v), g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, g)
    for ours, theirs in zip((y,) + grads, (ref,) + ref_grads):
        assert (ours.double() - theirs).abs().max().item() < tol * max(1.0, theirs.abs().max().item())


def test_attention_dropout_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(3)  # the same mask on every evaluation
        return _CPUAttention.apply(q, k, v, 0.4)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_attention_dropout_rate():
    """Our attention dropout (_CPUAttention: training, so inputs that need gradients) drops a
    fraction p of the causal entries and scales the rest by 1/(1-p): with q = k = 0 every causal
    key has probability 1/(i+1); one-hot values read the mask back."""
    torch.manual_seed(0)
    B, nh, T, p = 4, 4, 64, 0.2
    q = torch.zeros(B, nh, T, T, requires_grad=True)
    k = torch.zeros(B, nh, T, T)
    v = torch.eye(T).expand(B, nh, T, T)
    y = causal_attention(q, k, v, p)
    assert y.grad_fn.name() == "_CPUAttentionBackward"  # ours, not torch's SDPA dropout
    y = y.detach() * torch.arange(1, T + 1).view(T, 1)  # M_ij / (1-p)
    lower = torch.ones(T, T, dtype=torch.bool).tril().expand_as(y)
    kept = y[lower]
    assert abs((kept == 0).float().mean().item() - p) < 0.01
    assert torch.allclose(kept[kept != 0], torch.tensor(1 / (1 - p)), rtol=1e-4)
    assert (y[~lower] == 0).all()  # still causal


def test_causal_mask_draws_every_causal_entry_independently():
    """The half-size draw of _dropped_causal must not reuse a draw below the diagonal: a reused
    draw would show up as two perfectly correlated entries."""
    torch.manual_seed(0)
    T = 16
    drop, _ = _dropped_causal(500, 1, T, 0.5)
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    samples = drop[:, 0][:, lower].float()  # (500, T(T+1)/2)
    assert abs(samples.mean().item() - 0.5) < 0.01
    corr = torch.corrcoef(samples.T) - torch.eye(samples.size(1))
    assert corr.abs().max().item() < 0.35  # noise only (a reused draw gives 1)


@pytest.mark.parametrize("T", [9, 16])
def test_attention_mask_does_not_depend_on_the_chunking(T):
    """_CPUAttention draws its mask a few batch rows at a time: the same torch seed must give
    the same mask whether the rows come all at once or one by one."""
    torch.manual_seed(5)
    whole, _ = _dropped_causal(4, 3, T, 0.3)
    torch.manual_seed(5)
    stream = cpu_kernels._CausalDropStream(3, T, 0.3)
    rows = [torch.from_numpy(stream.drop(n)) for n in (1, 2, 1)]
    assert torch.equal(torch.cat(rows), whole)


def test_dropout_zero_and_eval_keep_the_plain_paths():
    """Dropout 0 in training and any dropout in eval take torch's own paths: the model gives the
    same logits, float32 attention that needs gradients stays on SDPA at p = 0 (and takes ours
    at p > 0), and dropout at p = 0 or in eval returns its input itself."""
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, bias=True)
    with_dropout, without = GPT(GPTConfig(dropout=0.3, **cfg)), GPT(GPTConfig(dropout=0.0, **cfg))
    without.load_state_dict(with_dropout.state_dict())
    idx = torch.randint(40, (3, 16))
    with_dropout.eval()
    without.train()  # dropout 0 in training: the same computation as eval
    logits_eval, _ = with_dropout(idx, idx)
    logits_train, _ = without(idx, idx)
    assert torch.equal(logits_eval, logits_train)
    q, k, v = (torch.randn(2, 2, 8, 4, requires_grad=True) for _ in range(3))
    plain = causal_attention(q, k, v, 0.0)
    assert plain.grad_fn.name().startswith("ScaledDotProduct")  # torch's SDPA, not _CPUAttention
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert causal_attention(q, k, v, 0.3).grad_fn.name() == "_CPUAttentionBackward"
    x = torch.randn(3, 5, requires_grad=True)
    assert Dropout(0.0).train()(x) is x and Dropout(0.3).eval()(x) is x


def test_fast_paths_are_cpu_only():
    assert cpu_kernels.use_cpu_dropout(torch.empty(1))
    assert not cpu_kernels.use_cpu_dropout(torch.empty(1, device="meta"))


def test_training_with_dropout_is_deterministic_and_learns():
    def run():
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
        opt = m.configure_optimizer(0.0, 3e-3, (0.9, 0.99), "cpu")
        idx = torch.arange(17).remainder(20).repeat(4, 1)
        losses = []
        for _ in range(30):
            _, loss = m(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    first, second = run(), run()
    assert first == second
    assert first[-1] < first[0] - 1.0


def test_bench_runs_end_to_end():
    flags = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=50",
             "--peak_size=64", "--warmup=0", "--repeats=2", "--train_steps=1", "--sample_tokens=4",
             "--sample_batch=3", "--optimizer=muon", "--process_runs=1", "--profile", "--glibc_malloc=true",
             "--sample_compile=false"]  # the compiled step's build is tested in test_fast_decode.py
    out = subprocess.run([sys.executable, "bench.py", *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ["matmul peak", "train ", "train MFU", "train, nanoGPT's step", "train MFU, nanoGPT's step",
                 "sample, kv cache", "sample, nanoGPT loop",
                 "sample, kv cache, batch 3", "sample, fast path", "sample, fast path, batch 3",
                 "nanoGPT sample.py, first run", "sample.py, first run", "sample.py --compile=false, first run",
                 "sample.py --dtype=float32, first run", *(["train, glibc's malloc"] * hardware.keep_freed_memory(False)),
                 "Self CPU time total"]:  # the last: --profile's table
        assert name in out.stdout
    assert "no nanoGPT rows" not in out.stdout


def test_bench_says_why_a_model_beyond_gpt2_has_no_nanogpt_rows():
    flags = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=50",
             "--peak_size=64", "--warmup=0", "--repeats=1", "--train_steps=1", "--skip_sample", "--rotary=True"]
    out = subprocess.run([sys.executable, "bench.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "options beyond GPT-2: rotary=True (so no nanoGPT rows: its model is GPT-2's)" in out.stdout
    assert "nanoGPT's step" not in out.stdout


def test_torch_kernels_switches_dropout_and_attention_back_to_torchs():
    """bench.py's nanoGPT baseline: inside cpu_kernels.torch_kernels() the model's dropout is
    torch's (the same mask as F.dropout from the same seed) and attention is SDPA's."""
    x = torch.randn(4, 64, requires_grad=True)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    with cpu_kernels.torch_kernels():
        torch.manual_seed(3)
        ours = cpu_kernels.Dropout(0.5).train()(x)
        torch.manual_seed(3)
        att = cpu_kernels.causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.5))
    assert torch.equal(att, F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True))
    assert att.grad_fn.name() != "_CPUAttentionBackward"
    assert cpu_kernels.Dropout(0.5).train()(x).grad_fn.name() == "_CPUDropoutBackward"  # ours again after the block


@pytest.mark.parametrize("options", [{}, {"rotary": True}, {"tie_head": False}])
def test_from_state_dict_equals_a_new_model_loaded_and_draws_no_random_numbers(options):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, **options)
    torch.manual_seed(0)
    reference = GPT(config)
    reference.transformer.h[0].attn.c_attn.weight.data.normal_()  # nothing an init would draw
    rng = torch.get_rng_state()
    model = GPT.from_state_dict(config, reference.state_dict())
    assert torch.equal(torch.get_rng_state(), rng)  # no weight was drawn and thrown away
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(idx)[0], reference(idx)[0])
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_head
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_from_state_dict_restores_torchs_init_even_when_the_state_does_not_fit():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=20)
    fills = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    with pytest.raises(RuntimeError):
        GPT.from_state_dict(config, {"lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError):  # a bad config raises inside the construction
        GPT.from_state_dict(GPTConfig(n_layer=1, n_head=3, n_embd=32), {})
    assert all(getattr(torch.nn.init, name) is fill for name, fill in fills.items())
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5  # drawing again


@pytest.mark.parametrize("script", ["train", "sample", "eval", "export", "app", "bench"])
def test_a_stage_script_leaves_garbage_collection_on(script):
    # the scripts turn the collector off while torch imports; a script that forgot to turn it
    # back on would never free cyclic garbage in a long run
    code = f"import gc, {script}; assert gc.isenabled(), 'collector off'; assert gc.get_freeze_count() > 0, 'nothing frozen'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


# ---------------------------------------------------------------------------- the C kernels

def _both_paths(run):
    """run() under the same seed with the numpy path and with the C kernels, on two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_kernels.without_c():
            torch.manual_seed(11)
            numpy_result = run()
        torch.manual_seed(11)
        c_result = run()
    finally:
        torch.set_num_threads(threads)
    return numpy_result, c_result


def test_the_c_kernels_are_built_where_a_compiler_is():
    if cpu_kernels._compiler() is None or sys.platform == "win32":
        pytest.skip("no C compiler here: the numpy path is the only one")
    assert cpu_kernels._c() is not None, cpu_kernels.kernels_used()
    assert cpu_kernels.kernels_used().startswith("C kernels")
    with cpu_kernels.without_c():
        assert cpu_kernels._c() is None


def test_the_c_generator_gives_numpys_words():
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    torch.manual_seed(3)
    ours = cpu_kernels._Bits()
    torch.manual_seed(3)
    reference = cpu_kernels._Bits().numpy
    for n in (1, 7, 1000, 3):  # the state carries over from call to call
        assert (ours.words(n) == reference.random_raw(n).view("int16")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 70_001])  # under and over the size split between threads
def test_c_dropout_equals_the_numpy_path_bit_for_bit(dtype, n):
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    x = torch.randn(n, dtype=dtype)
    x[:3] = torch.tensor([float("nan"), float("-inf"), -0.0])[: min(n, 3)].to(dtype)
    g = torch.randn(n, dtype=dtype)

    def run():
        leaf = x.clone().requires_grad_()
        y = Dropout(0.2).train()(leaf)
        y.backward(g)
        return y.detach(), leaf.grad

    (y0, g0), (y1, g1) = _both_paths(run)
    assert torch.equal(y0.isnan(), y1.isnan())  # (torch's own NaN bits differ between its code paths)
    assert torch.equal(y0[~y0.isnan()].view(torch.uint8), y1[~y1.isnan()].view(torch.uint8))  # -0 too
    assert torch.equal(g0, g1)
    # the kernels keep the random bits for the backward pass, not a mask tensor
    assert Dropout(0.2).train()(x.clone().requires_grad_()).grad_fn.name() == "_CPUDropoutBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, nh, T", [(5, 3, 16), (3, 2, 7), (2, 1, 6), (9, 2, 32)])
def test_c_attention_dropout_equals_the_numpy_path_bit_for_bit(dtype, B, nh, T):
    """(3, 2, 7): odd T draws the square; (2, 1, 6): a batch row's draws end mid-word (a gap)."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    q, k, v = (torch.randn(B, nh, T, 8, dtype=dtype) for _ in range(3))
    g = torch.randn(B, nh, T, 8, dtype=dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = causal_attention(*leaves, 0.3)
        y.backward(g)
        return [y.detach()] + [t.grad for t in leaves]

    numpy_result, c_result = _both_paths(run)
    for a, b in zip(numpy_result, c_result):
        assert torch.equal(a, b)


def test_a_failed_build_falls_back_to_numpy_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    if sys.platform == "win32" or not __import__("shutil").which("false"):
        pytest.skip("no 'false' command here")
    assert cpu_kernels._c() is None
    assert "false could not build cpu_kernels.c" in cpu_kernels.kernels_used()
    torch.manual_seed(0)
    y = Dropout(0.5).train()(torch.ones(1000))  # still drops, on the numpy path
    assert 400 < (y == 0).sum() < 600
    assert not list(tmp_path.rglob("*.partial*"))  # nothing half-built left behind
    # the next process does not spend the same half minute failing again: the failure is remembered
    # (for a day, for this compiler file and source), and said with how to try again
    calls = []
    monkeypatch.setattr(cpu_kernels, "_build", lambda *args: calls.append(args) or "built")
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    assert cpu_kernels._c() is None and calls == []
    marker, = tmp_path.rglob("*.failed")
    assert cpu_kernels.kernels_used().endswith(f"false could not build cpu_kernels.c: no message; that build "
                                               f"failed here today: delete {marker} to try again)")
    day_ago = __import__("time").time() - 25 * 3600
    os.utime(marker, (day_ago, day_ago))
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    assert cpu_kernels._c() is None and len(calls) == 1  # a day on: tried again
    cpu_kernels.remember_failure(marker, "it failed", cpu_kernels._compiler())
    assert cpu_kernels.remembered_failure(marker, cpu_kernels._compiler()) == "it failed"
    (tmp_path / "cc").write_text("#!/bin/sh\n", encoding="utf-8")  # another compiler file (reinstalled, mended)
    assert cpu_kernels.remembered_failure(marker, str(tmp_path / "cc")) is None


def test_macos_without_xcode_tools_does_not_run_the_compiler_stub(monkeypatch, tmp_path):
    """macOS has /usr/bin/cc without Xcode's command line tools: a stub that fails and pops up
    an install dialog. Without the tools (xcode-select -p fails) it is not run at all."""
    import subprocess
    monkeypatch.setattr(cpu_kernels.sys, "platform", "darwin")
    runs = []

    def run(cmd, **kwargs):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 2)
    monkeypatch.setattr(subprocess, "run", run)
    assert "xcode-select --install" in cpu_kernels.no_apple_compiler("/usr/bin/cc")
    assert runs == [["xcode-select", "-p"]]
    assert cpu_kernels.no_apple_compiler("/opt/homebrew/bin/gcc-14") is None
    monkeypatch.setattr(cpu_kernels.sys, "platform", "linux")
    assert cpu_kernels.no_apple_compiler("/usr/bin/cc") is None and len(runs) == 1


def test_a_cache_that_cannot_be_written_falls_back_to_numpy(monkeypatch, tmp_path):
    if cpu_kernels._compiler() is None or sys.platform == "win32":
        pytest.skip("no C compiler here")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert cpu_kernels._c() is None
    assert cpu_kernels.kernels_used().startswith("numpy kernels (")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_dropout_in_one_pass_equals_the_add_of_a_dropout(dtype):
    """cpu_kernels.residual_dropout (Block's x + dropout(sublayer)): the fused C pass against
    the plain `x + dropout(y)`, forward and both gradients, bit for bit."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    x, y = torch.randn(3, 50, 64), torch.randn(3, 50, 64).to(dtype)
    g = torch.randn(3, 50, 64)

    def run():
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = cpu_kernels.residual_dropout(xl, yl, Dropout(0.2).train())
        out.backward(g)
        return out.detach(), xl.grad, yl.grad, out.grad_fn.name()

    (*plain, plain_op), (*fused, fused_op) = _both_paths(run)
    assert (plain_op, fused_op) == ("AddBackward0", "_CPUResidualDropoutBackward")
    for a, b in zip(plain, fused):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _graph_names(tensor) -> set[str]:
    """The names of every node of tensor's autograd graph."""
    names, seen, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("options, kernels", [
    (dict(qk_norm=True), {"_CPUQKHeadsBackward"}),  # the heads' split, qk_norm and rotary in one pass
    (dict(qk_norm=False, norm="rmsnorm"), {"_CPURotaryBackward", "_CPURMSNormBackward"}),
], ids=["qk_heads", "rotary_rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_is_the_same_with_and_without_the_c_kernels(dtype, options, kernels):
    """A whole GPT forward and backward with every dropout on (embeddings, attention, the
    residual adds) and the options that have kernels: the same loss and the same gradients on
    both paths, the C path having taken every kernel it has for them."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=40, dropout=0.2,
                          rotary=True, activation="relu2", **options))
    x, y = torch.randint(0, 40, (8, 16)), torch.randint(0, 40, (8, 16))
    graphs = []

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, y)
        graphs.append(_graph_names(loss))
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    for a, b in zip(*_both_paths(run)):
        assert torch.equal(a, b)
    used = kernels | {"_CPUReLUSquaredBackward", "_CPUResidualDropoutBackward", "_CPUAttentionBackward"}
    numpy_graph, c_graph = graphs
    assert used <= c_graph and not kernels & numpy_graph, (c_graph, numpy_graph)  # each path's own ops


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values (any NaN as any NaN: torch's own kernels differ in NaN's bits), zeros'
    signs included, and the same layout."""
    return (a.dtype == b.dtype and a.stride() == b.stride()
            and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
            and torch.equal(a.signbit() & ~a.isnan(), b.signbit() & ~b.isnan()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_in_one_pass_equals_torchs(dtype):
    """model.ReLUSquared's kernel: forward and backward equal F.relu(x).square() and autograd's
    gradient of it, specials included."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    torch.manual_seed(0)
    specials = torch.tensor([float("nan"), 0.0, -0.0, float("inf"), -float("inf"), 1e30, -1e-30, 3e38])
    x = torch.cat([specials, torch.randn(69_992) * 4]).to(dtype).view(10, -1)
    g = torch.cat([torch.tensor([1.0, float("nan"), float("inf"), 2.0, 0.0, -0.0, 5.0, 1e38]),
                   torch.randn(69_992)]).to(dtype).view(10, -1)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = cpu_kernels.relu_squared(ours)
    assert type(out.grad_fn).__name__ == "_CPUReLUSquaredBackward"
    expected = F.relu(theirs).square()
    assert _same(out, expected)
    out.backward(g)
    expected.backward(g)
    assert _same(ours.grad, theirs.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sequence", [False, True])  # cos (T, h) or per-sequence (B, 1, T, h)
@pytest.mark.parametrize("hs", [16, 50])  # half rows of 8, and of 25: vectors of 16, of 8, one left
def test_rotary_in_one_pass_equals_torchs(per_sequence, dtype, hs):
    """model.apply_rotary by the C kernel equals its torch ops, forward and backward, on q as
    the model has it (a strided view of c_attn's output), in float32 and in bf16 (where every
    product and sum rounds to bf16), specials and values at bf16's largest included; and the
    kernel called on parts of the rows (as Python threads split it without OpenMP) gives the
    same rows as one call."""
    import model
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    torch.manual_seed(0)
    B, nh, T = 4, 3, 40
    x = torch.randn(B, T, nh, hs) * torch.rand(B, T, nh, 1) * 8
    x.view(-1)[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.38e38, -3.39e38, 1e-40])
    x = x.to(dtype).transpose(1, 2)
    angles = torch.randn(B, T, hs // 2) if per_sequence else torch.randn(T, hs // 2)
    cos, sin = angles.cos(), angles.sin()
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = model.apply_rotary(ours * 1, cos, sin)  # ours * 1: keeps the strided layout
    assert type(out.grad_fn).__name__ == "_CPURotaryBackward"
    with cpu_kernels.without_c():
        expected = model.apply_rotary(theirs * 1, cos, sin)
    assert _same(out, expected)
    g = torch.randn(B, nh, T, hs) * 4
    g.view(-1)[-4:] = torch.tensor([float("nan"), 3.38e38, -0.0, float("inf")])
    out.backward(g.to(dtype))
    expected.backward(g.to(dtype))
    assert _same(ours.grad, theirs.grad)
    kernel = getattr(cpu_kernels._c(), f"rotary_{cpu_kernels._C_TYPES[dtype]}")
    cos, sin = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()
    parts = torch.empty(x.shape, dtype=dtype)
    for start, stop in ((0, 37), (37, 200), (200, 201), (201, B * nh * T)):  # rows, across heads' ends
        kernel(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), parts.data_ptr(), start, stop, nh, T, hs // 2,
               *x.stride()[:3], T * hs // 2 if per_sequence else 0, 0)
    assert _same(parts, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sequence", [False, True])  # cos (T, h) or per-sequence (B, T, h)
@pytest.mark.parametrize("hs", [16, 48, 50])  # half rows: a vector of 8; 16 and 8; 16, 8 and one
def test_attention_heads_in_one_pass_equal_torchs(per_sequence, dtype, hs):
    """cpu_kernels.qk_heads (the split into heads, qk_norm and rotary in one C pass each way)
    equals model.py's views, F.rms_norm and torch's rotary ops, forward and backward (qkv's
    gradient), specials included, in float32 and bf16; and its kernels called on parts of the
    rows (as Python threads split them without OpenMP) give what one call gives."""
    import model
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    lanes = cpu_kernels._sum_lanes(hs)
    if not lanes:
        pytest.skip("torch's sum order is not one cpu_kernels.c knows on this machine")
    torch.manual_seed(0)
    B, T, nh = 3, 20, 3
    qkv = (torch.randn(B, T, 3 * nh, hs) * torch.rand(B, T, 3 * nh, 1) * 8).view(B, T, -1)  # rows of all sizes
    qkv.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), 0.0, -0.0, 3.38e38, 1e-40])
    qkv.view(B, T, 3 * nh, hs)[1, 2, :2] = 0.0  # rows of zeros
    qkv = qkv.to(dtype)
    angles = torch.randn(B, T, hs // 2) if per_sequence else torch.randn(T, hs // 2)
    cos, sin = angles.cos(), angles.sin()
    grads = [torch.randn(B, nh, T, hs).to(dtype) for _ in range(3)]
    grads[0].view(-1)[-3:] = torch.tensor([float("nan"), -0.0, 3.38e38]).to(dtype)

    def run(fused):
        x = qkv.clone().requires_grad_()
        if fused:
            q, k, v = cpu_kernels.qk_heads(x, nh, cos, sin)
            assert type(q.grad_fn).__name__ == "_CPUQKHeadsBackward"
        else:
            with cpu_kernels.without_c():
                q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2))
                c, s = (cos[:, None], sin[:, None]) if per_sequence else (cos, sin)
                q, k = (model.apply_rotary(F.rms_norm(t, (hs,)), c, s) for t in (q, k))
        torch.autograd.backward([q, k, v], grads)
        return q, k, v, x.grad

    for ours, theirs in zip(run(True), run(False)):
        assert _same(ours.detach(), theirs.detach().contiguous())
    lib, t = cpu_kernels._c(), cpu_kernels._C_TYPES[dtype]
    c, s = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()
    rest = (B * T, T, nh, hs, T * hs // 2 if per_sequence else 0, lanes)
    whole, parts = [torch.empty(3, B, nh, T, hs, dtype=dtype) for _ in range(2)]
    r_whole, r_parts = torch.empty(B, T, 2, nh), torch.empty(B, T, 2, nh)
    dx_whole, dx_parts = torch.empty_like(qkv), torch.empty_like(qkv)
    eps = torch.finfo(torch.float32).eps
    for start, stop in ((0, B * T), (0, 7), (7, 21), (21, B * T)):  # rows (b, t), across sequences' ends
        out, r, dx = (whole, r_whole, dx_whole) if stop - start == B * T else (parts, r_parts, dx_parts)
        getattr(lib, f"qk_forward_{t}")(qkv.data_ptr(), c.data_ptr(), s.data_ptr(), out.data_ptr(), r.data_ptr(),
                                        start, stop, *rest, eps)
        getattr(lib, f"qk_backward_{t}")(qkv.data_ptr(), *(g.data_ptr() for g in grads), r.data_ptr(), c.data_ptr(),
                                         s.data_ptr(), dx.data_ptr(), start, stop, *rest)
    assert _same(whole, parts) and _same(r_whole, r_parts) and _same(dx_whole, dx_parts)


def test_attention_heads_in_one_pass_only_where_they_apply():
    """qk_heads hands back None (model.py then runs its own ops) without a gradient to keep, and
    for head sizes its kernels do not take."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    cos, sin = torch.ones(8, 24), torch.zeros(8, 24)
    qkv = torch.randn(2, 8, 3 * 4 * 48)
    assert cpu_kernels.qk_heads(qkv, 4, cos, sin) is None  # no gradient wanted
    with torch.no_grad():
        assert cpu_kernels.qk_heads(qkv.requires_grad_(), 4, cos, sin) is None
    assert cpu_kernels.qk_heads(qkv, 4, cos, sin) is not None
    odd = torch.randn(2, 8, 3 * 4 * 47, requires_grad=True)
    assert cpu_kernels.qk_heads(odd, 4, torch.ones(8, 23), torch.zeros(8, 23)) is None


def test_the_c_row_sums_add_in_torchs_order():
    """cpu_kernels.c's torch_sum gives torch.sum's float32 row sums bit for bit, at the vector
    width _sum_lanes found, on rows short and long (long enough for ATen's cascade of chunks)."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    lanes = cpu_kernels._sum_lanes(192)
    if not lanes:
        pytest.skip("torch's sum order is not one cpu_kernels.c knows on this machine: torch reduces")
    torch.manual_seed(0)
    for n in (lanes, 37, 48, 192, 1000, 8192, 70_001):
        rows = torch.randn(5, n) * torch.rand(5, 1) * 100
        ours = torch.empty(5)
        cpu_kernels._c().row_sums_f32(rows.data_ptr(), ours.data_ptr(), 0, 5, n, lanes)
        assert torch.equal(ours, rows.sum(-1)), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["residual", "qk"])
@pytest.mark.parametrize("c_sums", [True, False])  # the row sums in C, or torch's reductions
def test_rms_norm_in_fewer_passes_equals_torchs(dtype, where, c_sums, monkeypatch):
    """cpu_kernels.rms_norm equals F.rms_norm forward, and backward the gradient autograd gives
    its composite, where it meets other gradients: the residual stream's input, used by the
    norm and by the residual add (a float32 x takes the norm's two terms one at a time), and a
    head's q as the model has it (a strided view of c_attn's output)."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    if not c_sums:
        monkeypatch.setattr(cpu_kernels, "_sum_lanes", lambda n: 0)
    torch.manual_seed(0)
    w = torch.randn(192, 192).to(dtype) * 0.1
    base = torch.randn(8, 16, 3 * 192)  # a head's q: 6,144 values, enough for the C kernels

    def run(norm):
        x = base.to(dtype).clone().requires_grad_()  # a new leaf each run
        if where == "residual":
            h = x[..., :192] * 1
            y = h + norm(h, (192,)) @ w
        else:  # (B, nh, T, hs) from (B, T, 3C)
            q = x[..., :192].view(8, 16, 4, 48).transpose(1, 2)
            y = norm(q, (48,)).transpose(1, 2).reshape(8, 16, 192) @ w
        y.float().square().sum().backward()
        return y, x.grad

    (y, grad), (expected_y, expected_grad) = run(cpu_kernels.rms_norm), run(F.rms_norm)
    assert _same(y, expected_y) and _same(grad, expected_grad)
    x = base[..., :192].to(dtype).clone().requires_grad_()
    assert type(cpu_kernels.rms_norm(x * 1, (192,)).grad_fn).__name__ == "_CPURMSNormBackward"
    q = (x * 1).view(8, 16, 4, 48).transpose(1, 2)
    assert type(cpu_kernels.rms_norm(q, (48,)).grad_fn).__name__ == "_CPURMSNormBackward"
    with torch.no_grad():  # evaluation and sampling keep torch's op
        assert cpu_kernels.rms_norm(x, (192,)).grad_fn is None


def test_the_openmp_build_shares_torchs_threads():
    """Built with OpenMP, the kernels must load torch's own libgomp (the one already in the
    process), not a second runtime with threads of its own."""
    lib = cpu_kernels._c()
    if lib is None or not lib.openmp or not sys.platform.startswith("linux"):
        pytest.skip("no OpenMP build here")
    with open("/proc/self/maps", encoding="utf-8") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


def test_python_threads_split_a_call_like_openmp(monkeypatch):
    """Where the kernels have no OpenMP (Apple's clang), Python threads split each call: the
    same values as one call over the whole range."""
    lib = cpu_kernels._c()
    if lib is None:
        pytest.skip(cpu_kernels.kernels_used())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(200_003).bfloat16()
        bits = torch.from_numpy(cpu_kernels._random_int16(x.numel()))
        whole, split = torch.empty_like(x), torch.empty_like(x)
        lib.mask_mul_bf16(x.data_ptr(), bits.data_ptr(), whole.data_ptr(), 0, x.numel(), -19661, 1.25)
        monkeypatch.setattr(lib, "openmp", False)
        cpu_kernels._on_all_cores(lib.mask_mul_bf16, x.numel(), 1, (x, bits, split), -19661, 1.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, split) and (whole == 0).any()


def test_the_kernels_build_with_clang_for_avx2_and_give_the_same_values(tmp_path, monkeypatch):
    """cpu_kernels.c builds with clang, macOS's compiler (and a Linux user's `CC=clang`), in one
    compile of the whole file (a probe finds out first whether -fopenmp links), for the CPU
    torch reports: here told AVX2 (on x86), the vector width of an AVX2-only CPU. The library
    has every kernel, and its rotary, row-sum and attention-heads kernels (explicit vectors of
    16 and 8) give the values of the library in use."""
    import ctypes
    import shutil
    import subprocess
    clang, lib = shutil.which("clang"), cpu_kernels._c()
    if clang is None or lib is None or sys.platform == "win32":
        pytest.skip("no clang here" if clang is None else cpu_kernels.kernels_used())
    path = tmp_path / "kernels.so"
    run, whole_builds = subprocess.run, []

    def counting_run(command, *args, **kwargs):
        whole_builds.extend([command] if str(cpu_kernels._SOURCE) in command else [])
        return run(command, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(subprocess, "run", counting_run)
        mp.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert cpu_kernels._build(clang, path) is None
    assert len(whole_builds) == 1, whole_builds
    if cpu_kernels._X86:
        assert "-mavx2" in whole_builds[0] and "-mavx512f" not in whole_builds[0], whole_builds
    assert cpu_kernels._missing_names(path) == [] and not list(tmp_path.glob("*partial*"))
    theirs = ctypes.CDLL(str(path))
    for name in ("rotary_bf16", "rms_sums_bf16", "qk_forward_bf16", "qk_backward_bf16"):
        getattr(theirs, name).argtypes, getattr(theirs, name).restype = cpu_kernels._SIGNATURES[name], None
    torch.manual_seed(0)
    B, nh, T, hs = 2, 3, 20, 50  # half rows of 25: vectors of 16 and 8, and one value alone
    x = (torch.randn(B, nh, T, hs) * 4).bfloat16()
    cos, sin = torch.randn(T, hs // 2).bfloat16(), torch.randn(T, hs // 2).bfloat16()
    args = (nh, T, hs // 2, *x.stride()[:3], 0, 0)
    ours, clangs = torch.empty_like(x), torch.empty_like(x)
    lib.rotary_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), ours.data_ptr(), 0, B * nh * T, *args)
    theirs.rotary_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), clangs.data_ptr(), 0, B * nh * T, *args)
    assert torch.equal(ours, clangs)
    if lanes := cpu_kernels._sum_lanes(hs):
        rows, layout = B * nh * T, cpu_kernels._row_layout(x)
        ours, clangs = torch.empty(rows), torch.empty(rows)
        lib.rms_sums_bf16(x.data_ptr(), x.data_ptr(), ours.data_ptr(), 0, rows, hs, *layout, lanes, 0)
        theirs.rms_sums_bf16(x.data_ptr(), x.data_ptr(), clangs.data_ptr(), 0, rows, hs, *layout, lanes, 0)
        assert torch.equal(ours, clangs)
        # the attention's heads in one pass, forward and backward
        qkv = (torch.randn(B, T, 3 * nh * hs) * 4).bfloat16()
        grads = [(torch.randn(B, nh, T, hs) * 4).bfloat16() for _ in range(3)]
        results = []
        for kernels in (lib, theirs):
            out, dx = torch.empty(3, B, nh, T, hs, dtype=torch.bfloat16), torch.empty_like(qkv)
            r = torch.empty(B, T, 2, nh)
            rest = (B * T, T, nh, hs, 0, lanes)
            kernels.qk_forward_bf16(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), r.data_ptr(),
                                    0, B * T, *rest, torch.finfo(torch.float32).eps)
            kernels.qk_backward_bf16(qkv.data_ptr(), *(g.data_ptr() for g in grads), r.data_ptr(), cos.data_ptr(),
                                     sin.data_ptr(), dx.data_ptr(), 0, B * T, *rest)
            results.append((out, r, dx))
        assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_library_without_every_kernel_is_not_used(monkeypatch):
    """A built library that lacks a kernel's name (a stale or foreign file) is not used:
    the numpy and torch path runs, and the reason kernels_used() prints names the missing kernel
    (before, the first training step died with an AttributeError)."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    monkeypatch.setitem(cpu_kernels._SIGNATURES, "no_such_kernel", ())
    lib, why = cpu_kernels._load()
    assert lib is None and "no_such_kernel" in why and why.startswith("numpy kernels")


def test_a_fresh_cache_builds_the_kernels_once(monkeypatch, tmp_path):
    """An empty cache: the first use builds the kernels' source there (nothing half-written
    left), a second process state loads the same file without building again. (A one-function
    source stands in for cpu_kernels.c, whose build the other tests make: this one is about the
    cache.)"""
    if cpu_kernels._compiler() is None or sys.platform == "win32":
        pytest.skip("no C compiler here")
    source = tmp_path / "kernels.c"
    source.write_text("int kernels_openmp(void) { return 0; }\n", encoding="utf-8")
    monkeypatch.setattr(cpu_kernels, "_SOURCE", source)
    monkeypatch.setattr(cpu_kernels, "_SIGNATURES", {"kernels_openmp": ()})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    assert cpu_kernels._c() is not None, cpu_kernels.kernels_used()
    folder = tmp_path / "nanogpt-toolkit" / "kernels"
    built = list(folder.iterdir())
    assert len(built) == 1 and "partial" not in built[0].name
    inode = built[0].stat().st_ino
    os.utime(built[0], (1e9, 1e9))  # long unused
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    with monkeypatch.context() as mp:
        mp.setattr(cpu_kernels, "_build", lambda *a: pytest.fail("built again"))
        assert cpu_kernels._c() is not None and built[0].stat().st_ino == inode
    assert built[0].stat().st_mtime > time.time() - 600  # a load marks it used
    # a new build (here: a new version of the source) removes the builds unused for a month
    stale, recent = folder / f"cpu_kernels-avx2-old{built[0].suffix}", folder / f"cpu_kernels-avx2-new{built[0].suffix}"
    for path, days in ((stale, hardware.CACHE_KEEP_DAYS + 1), (recent, hardware.CACHE_KEEP_DAYS - 1)):
        path.write_bytes(b"")
        os.utime(path, (time.time() - days * 86400,) * 2)
    source.write_text("int kernels_openmp(void) { return 1; }\n", encoding="utf-8")
    monkeypatch.setattr(cpu_kernels, "_c_state", {})
    assert cpu_kernels._c() is not None
    assert not stale.exists() and recent.exists() and built[0].exists() and len(list(folder.iterdir())) == 3


def test_residual_dropout_takes_the_plain_add_where_the_kernel_does_not_apply():
    """Eval mode, p = 0, a broadcast add and a bf16 residual stream: `x + dropout(y)` as written
    (the identity dropout adds y unchanged)."""
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert torch.equal(cpu_kernels.residual_dropout(x, y, Dropout(0.2).eval()), x + y)
    assert torch.equal(cpu_kernels.residual_dropout(x, y, Dropout(0.0).train()), x + y)
    torch.manual_seed(0)
    broadcast = cpu_kernels.residual_dropout(x, y[:1].requires_grad_(), Dropout(0.5).train())
    assert broadcast.shape == x.shape and broadcast.grad_fn.name() == "AddBackward0"
    low = cpu_kernels.residual_dropout(x.bfloat16(), y.bfloat16().requires_grad_(), Dropout(0.5).train())
    assert low.dtype == torch.bfloat16 and low.grad_fn.name() == "AddBackward0"


def _x86_64() -> bool:
    import platform
    return platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_backward_by_table_equals_torchs(approximate):
    """model.GELU in bf16 training: torch's forward, and a backward by lookups of torch's own
    float32 factor, equal torch's gradient bit for bit, specials included, on one to three
    threads and at sizes whose thread shares end in torch's scalar code (tanh's differs)."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    torch.manual_seed(0)
    specials = torch.tensor([float("nan"), 0.0, -0.0, float("inf"), -float("inf"), 1e30, -1e-30, 3e38, 5.5, -5.5])
    # hard inputs: where torch's scalar code (a strided tensor takes it) and its vector code differ
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    spaced, half = torch.empty(2 * 65536, dtype=torch.bfloat16), torch.full((65536,), 0.7, dtype=torch.bfloat16)
    spaced[::2] = every
    scalar = torch.ops.aten.gelu_backward(half.repeat_interleave(2)[::2], spaced[::2], approximate=approximate)
    vector = torch.ops.aten.gelu_backward(half, every, approximate=approximate)
    hard = every[(scalar.view(torch.int16) != vector.view(torch.int16)) & torch.isfinite(every)]
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for n, kind in [(4099, "random"), (32_769, "random"), (100_003, "random"), (5_055, "hard"), (50_001, "hard")]:
                if kind == "hard" and not hard.numel():
                    continue  # the two codes agree on every input (exact GELU with AVX2): none is hard
                if kind == "hard":  # every element one where the two codes differ
                    x, g = hard[torch.arange(n) % hard.numel()], torch.full((n,), 0.7).bfloat16()
                else:
                    x = torch.cat([specials, torch.randn(n - specials.numel()) * 3]).bfloat16()
                    g = torch.cat([specials.flip(0), torch.randn(n - specials.numel())]).bfloat16()
                ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
                out = cpu_kernels.gelu(ours, approximate)
                assert type(out.grad_fn).__name__ == "_CPUGELUBackward"
                expected = F.gelu(theirs, approximate=approximate)
                assert _same(out, expected)
                out.backward(g)
                expected.backward(g)
                assert _same(ours.grad, theirs.grad), (t, n)
            # where no layout of torch's loops matches, the backward is torch's own: on x86-64 one
            # does, but for the exact GELU with AVX2 only, whose bf16 backward in torch is not one
            # product with either float32 factor (2 of 65,536 inputs differ from both at g = 1.3)
            avx2_exact = approximate == "none" and torch.backends.cpu.get_cpu_capability() == "AVX2"
            assert cpu_kernels._gelu_tables[approximate].layout() is not None or not _x86_64() or avx2_exact
    finally:
        torch.set_num_threads(threads)
    assert cpu_kernels.gelu(x.float().requires_grad_(), approximate).grad_fn.name() == "GeluBackward0"  # float32: torch's
    with torch.no_grad():
        assert cpu_kernels.gelu(x, approximate).grad_fn is None


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_a_bf16_gelu_model_step_is_the_same_with_and_without_the_c_kernels(activation):
    """GPT-2's MLP (GELU) trained in bf16 autocast: the same loss and gradients on both paths."""
    if cpu_kernels._c() is None:
        pytest.skip(cpu_kernels.kernels_used())
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=40, dropout=0.1,
                          activation=activation))
    x, y = torch.randint(0, 40, (8, 16)), torch.randint(0, 40, (8, 16))

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    for a, b in zip(*_both_paths(run)):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.transformer.h[0].mlp.c_fc(torch.randn(8, 16, 64, requires_grad=True))
        assert type(model.transformer.h[0].mlp.act(h).grad_fn).__name__ == "_CPUGELUBackward"


def test_the_c_reductions_find_torchs_order_on_x86():
    """On x86 (torch's vector code AVX512 or AVX2) the row sums and the softmax must find
    torch's order: a change that loses it would otherwise only turn the kernels off."""
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_kernels._c() is None or capability not in ("AVX512", "AVX2"):
        pytest.skip(f"{cpu_kernels.kernels_used()}; torch's CPU code: {capability}")
    assert cpu_kernels._sum_lanes(192) in (16, 8)  # the sum's accumulators need not be one vector
    assert cpu_kernels._softmax_lanes() == (16 if capability == "AVX512" else 8)


def _causal_scores(n, T, scale, generator):
    """bf16 attention scores as q k^T makes them: the causal part is what counts."""
    q = torch.randn(n, T, 16, generator=generator) * scale
    return torch.bmm(q.bfloat16(), torch.randn(n, T, 16, generator=generator).bfloat16().transpose(1, 2))


@pytest.mark.parametrize("T", [1, 7, 16, 33, 100, 256])  # odd, whole vectors, a scalar tail
def test_the_causal_softmax_kernel_gives_torchs_softmax_and_mask_bit_for_bit(T):
    """cpu_kernels.c's causal softmax (only keys <= query computed) against torch.softmax of the
    masked scores and the dropout mask's pass after it: the same bits, at scales from flat
    rows to rows where one key takes everything."""
    if cpu_kernels._c() is None or not (lanes := cpu_kernels._softmax_lanes()):
        pytest.skip("no C kernels, or none with torch's softmax order here")
    gen = torch.Generator().manual_seed(T)
    causal = torch.full((T, T), float("-inf"), dtype=torch.bfloat16).triu_(1)
    for scale in (0.01, 1.0, 30.0, 3000.0):
        scores = _causal_scores(6, T, scale, gen)
        torch.manual_seed(7)
        stream = cpu_kernels._CausalDropStream(3, T, 0.25)
        probs, kept = stream.softmax(scores, lanes)
        theirs = torch.softmax(scores + causal, -1)
        torch.manual_seed(7)
        assert torch.equal(probs.view(torch.int16), theirs.view(torch.int16))
        assert torch.equal(kept.view(torch.int16), cpu_kernels._CausalDropStream(3, T, 0.25).apply(theirs).view(torch.int16))
        alone, none = cpu_kernels._causal_softmax(scores, lanes)  # no dropout: no mask pass
        assert none is None and torch.equal(alone.view(torch.int16), theirs.view(torch.int16))


def test_the_causal_softmax_kernel_keeps_torchs_exp_and_nan():
    """Its exp (Sleef's, as torch's vector code calls it) on every bf16 value <= 0, rounded,
    is torch's bf16 exp; a NaN score makes its whole row NaN and leaves the others alone."""
    if cpu_kernels._c() is None or not (lanes := cpu_kernels._softmax_lanes()):
        pytest.skip("no C kernels, or none with torch's softmax order here")
    values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[values <= 0]
    x, out = values.float(), torch.empty(values.numel())
    cpu_kernels._c().exp_f32(x.data_ptr(), out.data_ptr(), 0, x.numel())
    assert torch.equal(out.bfloat16().view(torch.int16), torch.exp(values).view(torch.int16))
    scores = _causal_scores(2, 40, 1.0, torch.Generator().manual_seed(0))
    scores[1, 20, 3] = float("nan")
    probs, _ = cpu_kernels._causal_softmax(scores, lanes)
    assert probs[1, 20, :21].isnan().all() and not probs[1, 20, 21:].isnan().any()
    probs[1, 20] = 0
    assert not probs.isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_is_the_same_with_the_c_softmax_and_row_sums_and_with_torchs(dtype, monkeypatch):
    """At a shape with whole vectors and chunks of several batch rows: the C softmax (bf16) and
    the backward's row sums of g * y in C, against torch's softmax, mask pass and sum, forward
    and backward, bit for bit."""
    if cpu_kernels._c() is None or not cpu_kernels._sum_lanes(32):
        pytest.skip("no C kernels, or none with torch's reduction order here")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 3, 64, 32, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    g = torch.randn(4, 3, 64, 32, generator=gen).to(dtype)
    lanes, sum_lanes = cpu_kernels._softmax_lanes(), cpu_kernels._sum_lanes
    results = []
    for c_reductions in (True, False):
        monkeypatch.setitem(cpu_kernels._c_state, "softmax_lanes", lanes if c_reductions else 0)
        monkeypatch.setattr(cpu_kernels, "_sum_lanes", sum_lanes if c_reductions else lambda n: 0)
        torch.manual_seed(3)
        y = causal_attention(q, k, v, 0.2)
        results.append([y, *torch.autograd.grad(y, (q, k, v), g)])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_hands_c_attns_output_its_gradient_whole(dtype, monkeypatch):
    """q, k, v split from c_attn's output: _CPUAttention's backward gives that output its gradient
    in one piece (no views' copies, no cat of three), the same values as through the views."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=40, dropout=0.1))
    x, y = torch.randint(0, 40, (8, 32)), torch.randint(0, 40, (8, 32))
    split_from, results = cpu_kernels._split_from, []
    for whole in (True, False):
        monkeypatch.setattr(cpu_kernels, "_split_from", split_from if whole else lambda q, k, v: None)
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, y)
        with torch.profiler.profile() as prof:
            loss.backward()
        ops = {e.key for e in prof.key_averages()}
        assert ("aten::cat" in ops) != whole
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    q, k, v = torch.randn(2, 5, 36, requires_grad=True).split(12, dim=2)
    assert split_from(*(t.view(2, 5, 3, 4).transpose(1, 2) for t in (q, k, v))) is not None
    assert split_from(*(t.view(2, 5, 3, 4).transpose(1, 2) for t in (q, v, k))) is None  # not in order


KEPT_MEMORY_FAULTS = """
import resource, sys
import torch
sys.path.insert(0, sys.argv[1])
import hardware

def faults():
    for _ in range(8):  # warm: the first ones fault their pages in (and settle the heap)
        torch.ones(1 << 24)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(1 << 24)  # 64 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

hardware.keep_freed_memory(False)
plain = faults()
assert hardware.keep_freed_memory(True)
print(plain, faults())
"""


def test_kept_memory_spares_the_page_faults_of_large_tensors():
    """hardware.keep_freed_memory: on Linux with glibc a freed 64 MB tensor's memory serves the
    next one (no fresh pages to fault in); off, each one is mapped anew. Elsewhere it says no.
    Measured in a process of its own: the heap of a process that ran other tests (their sizes,
    their malloc settings) may already hold such blocks. Kept, now and then one of the eight
    tensors still lands on fresh pages (1 run in 6 here): a quarter of the faults is the bound."""
    if not hardware.keep_freed_memory(False):
        assert not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
        pytest.skip("not glibc: malloc is left as it is")
    pytest.importorskip("resource")
    done = subprocess.run([sys.executable, "-c", KEPT_MEMORY_FAULTS, str(ROOT)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    plain, kept = map(int, done.stdout.split())
    assert plain > 8 * 10_000  # 16,384 pages of 4 KB each time
    assert kept < plain / 4, (plain, kept)


def test_the_kernels_are_built_for_the_cpu_torch_reports(monkeypatch, tmp_path):
    """One library per kind of CPU: the vector instructions of torch's own kernels for the
    capability torch reports (AVX512, AVX2) are in the build and in the cache file's name and
    key, so a cache folder shared by different CPUs never hands one a library built for another;
    a compiler that refuses the flags still gets a plain build."""
    if cpu_kernels._compiler() is None or sys.platform == "win32":
        pytest.skip("no C compiler here")
    if not cpu_kernels._X86:
        assert cpu_kernels._isa_flags() == []
        return
    source = tmp_path / "kernels.c"
    source.write_text("int kernels_openmp(void) { return 0; }\n", encoding="utf-8")
    monkeypatch.setattr(cpu_kernels, "_SOURCE", source)
    monkeypatch.setattr(cpu_kernels, "_SIGNATURES", {"kernels_openmp": ()})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "nanogpt-toolkit" / "kernels"
    names = {}
    for capability in ("AVX2", "DEFAULT"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert cpu_kernels._load()[0] is not None
        names[capability] = {p.name for p in folder.iterdir()} - set().union(*names.values())
    assert [n.split("-")[1] for n in names["AVX2"]] == ["avx2"], names
    assert [n.split("-")[1] for n in names["DEFAULT"]] == ["default"], names
    assert cpu_kernels._isa_flags() == [] and "-mavx2" in cpu_kernels._ISA_FLAGS["AVX2"]
    # flags the compiler refuses: the plain build after them
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setitem(cpu_kernels._ISA_FLAGS, "AVX512", ["-mno-such-flag"])
    assert cpu_kernels._build(cpu_kernels._compiler(), tmp_path / "plain.so") is None
    assert (tmp_path / "plain.so").exists()


def tiny_bench(**flags):
    import bench
    cfg = bench.BenchConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=50,
                            peak_size=64, warmup=0, repeats=3, train_steps=2, sample_tokens=4, sample_batch=3,
                            dropout=0.0, sample_compile=False, **flags)
    return bench, cfg, GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0))


def test_bench_flops_per_token_is_nanogpts_estimate():
    """6N for the weights' forward and backward plus attention's 12 * L * C * T (nanoGPT's estimate_mfu)."""
    bench, cfg, model = tiny_bench()
    assert bench.flops_per_token(model, cfg) == 6 * model.num_params() + 12 * 1 * 32 * 16


def test_bench_train_rates_are_tokens_and_flop_per_second(monkeypatch):
    """With every timed call taking one second: train is the tokens of a timed run (train_steps
    optimizer steps of gradient_accumulation_steps x batch_size x block_size), the peak 2 n^3."""
    bench, cfg, model = tiny_bench(gradient_accumulation_steps=2)
    monkeypatch.setattr(bench, "timed", lambda fn, precision, warmup, repeats: [1.0] * repeats)
    rates = bench.bench_train(model, cfg, hardware.resolve("cpu", "float32"))
    assert rates["train"] == [2 * 2 * 2 * 16] * 3
    assert rates["matmul peak"] == [2 * 64 ** 3] * 3
    assert rates["train, nanoGPT's step"] == [2 * 2 * 2 * 16] * 3


def test_bench_prints_the_median_and_mfu_against_the_peak(monkeypatch, capsys):
    bench, _, _ = tiny_bench()
    train, nanogpt = [1000.0, 1000.0, 4000.0], [500.0, 500.0, 500.0]  # medians 1000 and 500 (means 2000, 500)
    monkeypatch.setattr(bench, "flops_per_token", lambda model, cfg: 2_000_000)
    monkeypatch.setattr(bench, "bench_train", lambda model, cfg, precision: {
        "train": train, "matmul peak": [1e9] * 3, "train, nanoGPT's step": nanogpt})
    flags = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=50",
             "--repeats=3", "--skip_sample=true", "--device=cpu", "--dropout=0"]
    bench.main(flags)
    out = capsys.readouterr().out
    rows = {line[:38].strip(): line[38:].split() for line in out.splitlines() if len(line) > 38}
    assert float(rows["train"][0].replace(",", "")) == 1000.0  # the median, then min and max
    assert rows["train"][1:3] == ["1,000.0", "4,000.0"]
    assert rows["train MFU"][0] == "200.0"  # 1000 tokens/s x 2 MFLOP per token / 1 GFLOP/s, in %
    assert float(rows["train step"][0].replace(",", "")) == pytest.approx(2 * 16 / 1000 * 1000, abs=0.05)
    assert "ours is 2.0x" in out
    assert rows["train MFU, nanoGPT's step"][0] == "100.0"


def test_bench_sample_rows_time_what_they_name(monkeypatch):
    """Each row times its own generation: nanoGPT's loop is nanogpt_generate, and a batch row
    counts the tokens of all its sequences."""
    import types
    bench, cfg, model = tiny_bench()
    clock = [0.0]
    real = bench.nanogpt_generate

    def slow_nanogpt(*args, **kwargs):
        clock[0] += 9.0  # nanoGPT's loop: 10 s a run, every other 1 s
        return real(*args, **kwargs)

    def perf_counter():  # one second between a row's two readings
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(bench, "nanogpt_generate", slow_nanogpt)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(bench.fast_decode, "auto_weights", lambda model, batch, compile: ("float32", "float32"))
    results = bench.bench_sample_side_by_side(model, cfg)
    assert results["sample, nanoGPT loop"][0] == [4 / 10] * 3
    assert results["sample, kv cache"][0] == [4 / 1] * 3
    assert results["sample, kv cache, batch 3"][0] == [3 * 4 / 1] * 3
    assert results["sample, fast path, batch 3"][0] == [3 * 4 / 1] * 3
    assert "batch 3, 4 new tokens" in results["sample, fast path, batch 3"][1]


def test_a_remembered_failure_lasts_a_day_says_why_and_a_cache_that_fails_is_no_error(tmp_path, monkeypatch):
    marker, cc = tmp_path / "new" / "cpu_kernels-x.failed", sys.executable  # (any file stands for the compiler)
    cpu_kernels.remember_failure(marker, "cc could not build cpu_kernels.c: no message", cc)  # its folder made
    assert cpu_kernels.remembered_failure(marker, cc) == "cc could not build cpu_kernels.c: no message"
    hours_ago = time.time() - 23 * 3600
    os.utime(marker, (hours_ago, hours_ago))
    assert cpu_kernels.remembered_failure(marker, cc) is not None  # still within the day
    marker.write_text(json.dumps({"compiler": cpu_kernels.compiler_stamp(cc)}), encoding="utf-8")
    assert cpu_kernels.remembered_failure(marker, cc) == "unknown"  # a note without its why still remembers it
    marker.write_text("", encoding="utf-8")
    assert cpu_kernels.remembered_failure(marker, cc) is None  # unreadable: no failure remembered
    assert cpu_kernels.remembered_failure(tmp_path / "none.failed", cc) is None
    (tmp_path / "folder.failed").mkdir()  # not readable as a note: no failure remembered
    assert cpu_kernels.remembered_failure(tmp_path / "folder.failed", cc) is None
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    cpu_kernels.remember_failure(tmp_path / "file" / "x.failed", "why", cc)  # a cache that cannot be written: no error


def test_macos_where_xcode_select_cannot_run_does_not_run_the_compiler_stub(monkeypatch):
    def run(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])
    monkeypatch.setattr(cpu_kernels.sys, "platform", "darwin")
    monkeypatch.setattr(subprocess, "run", run)
    assert "xcode-select --install" in cpu_kernels.no_apple_compiler("/usr/bin/cc")
