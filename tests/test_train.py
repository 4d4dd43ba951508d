"""model.py and train.py: the behaviour a user relies on when training."""
import json
import shutil
import os
import re
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import hardware
import train
import training
from conftest import TINY, ctrl_c_at_check, rank_output, torchrun, write_char_dataset
from errors import UserError
from model import GPT, GPTConfig, KVCache, Rotary, apply_rotary, document_mask, slide_window

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(**kw):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    return GPT(GPTConfig(**args))


def run_train(data_dir, out_dir, *flags):
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_attention_is_causal():
    model = tiny_model().eval()
    idx = torch.randint(0, 40, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 40
    logits_a, _ = model(idx, idx)
    logits_b, _ = model(changed, changed)
    assert torch.equal(logits_a[:, :10], logits_b[:, :10])  # the past cannot see the future
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_kv_cache_chunks_give_the_full_forwards_logits():
    """Feeding a sequence to the cache in chunks (a prompt, one token, then several at once)
    gives at each chunk's last token the logits of one forward over the whole sequence."""
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # off the init: every part of the model shows
    idx = torch.randint(0, 40, (2, 12))
    full, _ = model(idx, idx)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    for end, chunk in ((1, idx[:, :1]), (5, idx[:, 1:5]), (6, idx[:, 5:6]), (8, idx[:, 6:8]), (12, idx[:, 8:12])):
        logits, _ = model(chunk, kv_cache=cache)
        assert torch.allclose(logits[:, -1], full[:, end - 1], atol=1e-5), end
        assert cache.length == end and torch.equal(cache.last_token, idx[:, end - 1])
    k, v = cache.update(0, torch.zeros(2, 2, 1, 16), torch.ones(2, 2, 1, 16))  # views of all 13 positions
    assert k.shape == v.shape == (2, 2, 13, 16) and not k[:, :, -1].any() and v[:, :, -1].eq(1).all()
    assert cache.length == 12  # update writes; only advance counts the tokens
    with pytest.raises(AssertionError, match="holds 16 positions, asked for 17"):
        cache.update(1, torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16))
    buffer = cache.k[0]
    cache.reset()
    assert cache.length == 0 and cache.k[0] is buffer  # the buffers are kept for the next window
    model(idx[:, :4], kv_cache=cache)
    assert cache.length == 4 and cache.k[0] is buffer
    with pytest.raises(AssertionError, match="^KV cache reused with another batch size, dtype or device$"):
        model(idx[:1, 4:5], kv_cache=cache)
    cache.reset()  # empty, a cache takes another dtype (or batch size): new buffers
    k, _ = cache.update(0, torch.zeros(2, 2, 1, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 1, 16, dtype=torch.bfloat16))
    assert k.dtype == torch.bfloat16 and cache.k[0] is not buffer


def test_a_packed_document_computes_as_if_it_were_alone():
    """In a row of several documents (positions restart at each), every document's logits are
    those of the document alone: its own positions, no attention to the one before (also with
    rotary positions and the options that feed every block)."""
    for options in (dict(), dict(rotary=True, x0_lambdas=True, value_embeds=True)):
        model = tiny_model(**options)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        first, second = torch.tensor([[39, 5, 6, 7, 8]]), torch.tensor([[39, 9, 10, 11]])
        row = torch.cat([first, second], dim=1)
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
        model.eval()
        packed, _ = model(row, row, positions=positions)
        assert torch.allclose(packed[:, :5], model(first, first)[0], atol=1e-5)
        assert torch.allclose(packed[:, 5:], model(second, second)[0], atol=1e-5)
    with pytest.raises(AssertionError, match="^positions are for training rows, not cached generation$"):
        model(row, positions=positions, kv_cache=KVCache(2, 16))


def test_grad_checkpoint_gives_the_plain_gradients_in_document_rows_with_every_block_input():
    """Checkpointed blocks get every input of a plain block: the document mask, the rotary
    angles, the first input (x0_lambdas) and the value embeddings."""
    model = tiny_model(rotary=True, x0_lambdas=True, value_embeds=True).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    row = torch.tensor([[39, 5, 6, 7, 8, 39, 9, 10, 11]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    grads = []
    for checkpointed in (False, True):
        model.grad_checkpoint = checkpointed
        model.zero_grad()
        model(row, row, positions=positions)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))

def test_targets_of_minus_one_are_left_out_of_the_loss():
    model = tiny_model().eval()
    idx = torch.randint(0, 40, (2, 8))
    targets = idx.clone()
    targets[:, :3] = -1  # e.g. a prompt the loss should not teach
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].flatten(0, 1), idx[:, 3:].flatten())
    assert torch.allclose(loss, expected)

def test_a_sequence_longer_than_block_size_is_refused_with_its_length():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="^sequence of length 17 exceeds block_size 16$"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(2, 16)
    model(torch.zeros(1, 12, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="^sequence of length 17 exceeds block_size 16$"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_attention_dropout_applies_in_training_only():
    torch.manual_seed(0)
    attn = tiny_model(dropout=0.5).transformer.h[0].attn
    attn.resid_dropout = torch.nn.Identity()  # only the dropout inside attention is left
    x = torch.randn(2, 8, 32)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    plain = tiny_model(dropout=0.0).transformer.h[0].attn.eval()
    assert torch.equal(attn(x), attn(x)) and torch.allclose(attn(x), plain(x))


def test_the_window_slides_by_half_a_block_and_refills_the_cache():
    """slide_window hands the decoder only the tokens its cache lacks; past block_size the
    window jumps to the last block_size // 2 tokens and the cache starts again. A prompt longer
    than block_size starts from its last block_size tokens."""
    for use_cache in (True, False):
        fed = []

        def next_logits(tokens, cache):  # a decoder whose next token is the last one + 1
            fed.append(tokens[0].tolist())
            if cache is not None:
                cache.advance(tokens)
            return torch.nn.functional.one_hot((tokens[:, -1] + 1) % 40, 40).float()

        cache = KVCache(1, 4) if use_cache else None
        prompt = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
        new = list(slide_window(next_logits, 4, cache, prompt, 5, temperature=0))
        assert torch.equal(torch.stack(new, 1), torch.tensor([[16, 17, 18, 19, 20], [26, 27, 28, 29, 30]]))
        if use_cache:
            assert fed == [[12, 13, 14, 15], [15, 16], [17], [18], [18, 19]]
        else:
            assert fed == [[12, 13, 14, 15], [15, 16], [15, 16, 17], [15, 16, 17, 18], [18, 19]]


def test_the_repetition_penalty_sees_every_token_so_far_not_only_the_window():
    """Token 1, seen only before the window, is penalized; without a penalty (the default) it stays best."""
    def next_logits(tokens, cache):
        return torch.tensor([[0.0, 2.0, 1.5]])

    prompt = torch.tensor([[1, 0, 0]])  # block_size 2: the window starts after the 1
    penalized = list(slide_window(next_logits, 2, KVCache(1, 2), prompt, 2, temperature=0, repetition_penalty=2.0))
    assert [t.item() for t in penalized] == [2, 1]  # then 2 is seen too: 0, 1, 0.75
    plain = list(slide_window(next_logits, 2, None, prompt, 2, temperature=0))
    assert [t.item() for t in plain] == [1, 1]


def test_document_mask_is_causal_inside_each_document():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    mask = document_mask(positions)
    assert mask.shape == (2, 1, 5, 5)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                assert mask[b, 0, i, j] == (i - positions[b, i] <= j <= i), (b, i, j)


def test_rotary_turns_each_channel_pair_by_its_position_times_its_frequency():
    """Channel pair (i, i + hs/2) at position p turns by p * 10000^(-2i/hs): x1 + i x2 times e^(-i angle)."""
    rotary = Rotary(head_size=4, max_positions=8)
    angles = torch.tensor([[p * 10000 ** (-2 * i / 4) for i in range(2)] for p in range(8)])
    assert torch.allclose(rotary.cos, angles.cos(), atol=1e-6) and torch.allclose(rotary.sin, angles.sin(), atol=1e-6)
    x = torch.randn(2, 1, 3, 4, dtype=torch.float64)  # (B, nh, T, hs)
    positions = torch.tensor([[1, 2, 3], [5, 6, 7]])  # per sequence (B, T)
    cos, sin = rotary(positions)
    assert cos.shape == (2, 3, 2)
    turned = apply_rotary(x, cos, sin)
    assert turned.dtype == torch.float64 and apply_rotary(x.bfloat16(), cos, sin).dtype == torch.bfloat16
    assert not rotary.state_dict()  # derived from the shape: not saved in checkpoints
    z = torch.complex(x[..., :2], x[..., 2:]) * torch.exp(-1j * angles[positions][:, None].double())
    assert torch.allclose(turned, torch.cat([z.real, z.imag], dim=-1), atol=1e-5)
    cos, sin = rotary(positions[1])  # the same positions for every sequence (T,)
    assert torch.allclose(apply_rotary(x, cos, sin)[1], turned[1], atol=1e-6)


def test_gpt2_module_names_and_weight_tying():
    model = tiny_model()
    names = set(model.state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                 "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight


def final_loss_on_one_batch(model, opt, steps=150):
    x = torch.randint(0, 40, (4, 16))
    y = torch.roll(x, -1, dims=1)
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_single_batch_overfits():
    model = tiny_model()
    assert final_loss_on_one_batch(model, model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")) < 0.05


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu", "muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert adamw == set(names.values()) - muon and "transformer.wte.weight" in adamw
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
    assert final_loss_on_one_batch(model, opt) < 0.05


def test_loss_falls_on_tiny_corpus(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=60", "--eval_interval=30",
              "--learning_rate=1e-2", "--lr_decay_iters=60")
    evals = [r for r in read_metrics(tmp_path / "out") if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.8
    train_logs = [r for r in read_metrics(tmp_path / "out") if "tokens_per_sec" in r]
    assert [r["iter"] for r in train_logs] == list(range(60))
    for r in train_logs:  # a step's tokens (batch_size 4 x block_size 32) in its time
        assert r["tokens_per_sec"] > 0 and r["step_ms"] > 0
        assert r["tokens_per_sec"] * r["step_ms"] / 1000 == pytest.approx(4 * 32)
        assert r["lr"] == pytest.approx(training.get_lr(r["iter"], training.TrainConfig(
            learning_rate=1e-2, lr_decay_iters=60, max_iters=60, warmup_iters=2)))
        assert r["train/loss"] > 0


def test_gradient_accumulation_steps_are_one_big_batch(tiny_data, tmp_path, capsys):
    """--gradient_accumulation_steps=2 of batch_size 4 is one step over 8 rows: the same rows
    (the generator draws the starts of two batches of 4 as those of one of 8) and the same
    gradient (each micro-step's loss is divided by 2), so the same weights, to float32 rounding.
    Its tokens per iteration count both micro-steps, in the start-up line and in tokens/s."""
    common = ["--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--eval_at_start=False",
              "--learning_rate=1e-2", "--lr_decay_iters=2"]
    run_train(tiny_data, tmp_path / "accum", *common, "--batch_size=4", "--gradient_accumulation_steps=2")
    assert "tokens per iteration: 256\n" in capsys.readouterr().out  # 2 x 4 x 32
    for r in (r for r in read_metrics(tmp_path / "accum") if "tokens_per_sec" in r):
        assert r["tokens_per_sec"] * r["step_ms"] / 1000 == pytest.approx(256)
    run_train(tiny_data, tmp_path / "big", *common, "--batch_size=8")
    assert "tokens per iteration: 256\n" in capsys.readouterr().out
    accum, big = (checkpoint.load(tmp_path / d / "ckpt.pt") for d in ("accum", "big"))
    assert accum["iter_num"] == big["iter_num"] == 2
    for name, tensor in big["model"].items():
        assert torch.allclose(tensor, accum["model"][name], atol=2e-5, rtol=0), name
    run_train(tiny_data, tmp_path / "half", *common, "--batch_size=4")  # one micro-step of 4: other weights
    half = checkpoint.load(tmp_path / "half" / "ckpt.pt")
    assert not torch.allclose(half["model"]["transformer.wte.weight"], big["model"]["transformer.wte.weight"],
                              atol=1e-4, rtol=0)


def test_grad_clip_limits_the_steps(tiny_data, tmp_path):
    """--grad_clip scales the gradients down to that global norm before the optimizer sees them:
    clipped to 1e-14, far below AdamW's eps (1e-8), the steps all but vanish and (without weight
    decay) the weights stay where they started; unclipped (0), the same run moves them by about
    the learning rate per step."""
    common = ["--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--eval_at_start=False",
              "--learning_rate=1e-2", "--lr_decay_iters=3", "--weight_decay=0"]
    run_train(tiny_data, tmp_path / "clipped", *common, "--grad_clip=1e-14")
    run_train(tiny_data, tmp_path / "free", *common, "--grad_clip=0")
    clipped, free = (checkpoint.load(tmp_path / d / "ckpt.pt")["model"] for d in ("clipped", "free"))
    torch.manual_seed(1337)  # the run's initial weights (train.seed_rngs: --seed + rank)
    start = GPT(GPTConfig(**checkpoint.load(tmp_path / "free" / "ckpt.pt")["model_args"])).state_dict()
    moved = {name: (free[name] - start[name]).abs().max().item() for name in start}
    assert moved["transformer.wte.weight"] > 1e-3  # unclipped: steps of about the learning rate
    for name, tensor in start.items():  # clipped: no weight moved by more than a rounding error
        assert torch.allclose(clipped[name], tensor, atol=1e-6, rtol=0), name


def test_a_batch_of_a_split_of_exactly_one_window_reads_that_window(tmp_path):
    """A split of block_size + 1 tokens (the least a run accepts) holds a single window, at 0:
    every row of every batch is that window, never one that runs past the split's end."""
    import dataset
    from conftest import write_token_dataset
    block_size = 8
    ids = list(range(block_size + 1))
    write_token_dataset(tmp_path / "data", "one", train=ids, val=ids[::-1])
    data = dataset.Dataset(str(tmp_path / "data"), "one")
    gen = torch.Generator().manual_seed(0)
    for split, tokens in (("train", torch.tensor(ids)), ("val", torch.tensor(ids[::-1]))):
        for _ in range(20):
            x, y = data.get_batch(split, 16, block_size, gen, "cpu")
            assert x.shape == y.shape == (16, block_size)
            assert (x == tokens[:-1]).all() and (y == tokens[1:]).all()


def test_checkpoint_save_load_identical_logits(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=5", "--eval_interval=5")
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 5
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert ckpt["tokenizer"]["name"] == "char" and len(ckpt["tokenizer"]["chars"]) == ckpt["model_args"]["vocab_size"]
    model = GPT(GPTConfig(**ckpt["model_args"])).eval()
    model.load_state_dict(ckpt["model"])
    checkpoint.save({**ckpt, "model": model.state_dict()}, tmp_path / "again.pt")
    again = GPT(GPTConfig(**ckpt["model_args"])).eval()
    again.load_state_dict(checkpoint.load(tmp_path / "again.pt")["model"])
    x = torch.randint(0, ckpt["model_args"]["vocab_size"], (2, 32))
    assert torch.equal(model(x, x)[0], again(x, x)[0])
    # plain data only: the safe loader opens it
    torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)


@pytest.mark.parametrize("flags", [["--dropout=0.1", "--gradient_accumulation_steps=2"], ["--optimizer=muon"]])
def test_exact_resume(tiny_data, tmp_path, flags):
    """A run stopped at iteration 8 and resumed to 12 ends bit-identical to one run to 12."""
    common = ["--eval_interval=4", "--lr_decay_iters=12", *flags]
    run_train(tiny_data, tmp_path / "full", "--max_iters=12", *common)
    run_train(tiny_data, tmp_path / "part", "--max_iters=8", *common)
    assert checkpoint.load(tmp_path / "part" / "ckpt.pt")["iter_num"] == 8
    run_train(tiny_data, tmp_path / "part", "--max_iters=12", "--init_from=resume")
    full = checkpoint.load(tmp_path / "full" / "ckpt.pt")
    part = checkpoint.load(tmp_path / "part" / "ckpt.pt")
    assert part["iter_num"] == full["iter_num"] == 12
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    assert part["best_val_loss"] == full["best_val_loss"]
    # the resumed run picked up the saved settings it was not told to change
    for flag in flags:
        key, value = flag[2:].split("=")
        assert str(part["config"][key]) == value, key


def test_deterministic_is_for_gpus_and_a_resume_keeps_it(tiny_data, tmp_path, monkeypatch, capsys):
    """--deterministic turns torch's deterministic kernels on for a GPU (whose backward passes
    add with atomics) and leaves a CPU run as it is: reproducible already, the same weights with
    and without the flag, at full speed. A resume keeps the saved setting."""
    asked = []
    workspace = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)  # put back as it was after the test
    set_determinism = hardware.set_determinism
    monkeypatch.setattr(hardware, "set_determinism", lambda on, kind: asked.append(on) or set_determinism(on, kind))
    flags = ["--eval_interval=4", "--lr_decay_iters=8", "--dropout=0.1", "--optimizer=muon"]
    try:
        run_train(tiny_data, tmp_path / "plain", "--max_iters=8", *flags)
        run_train(tiny_data, tmp_path / "det", "--max_iters=4", "--deterministic=true", *flags)
        run_train(tiny_data, tmp_path / "det", "--max_iters=8", "--init_from=resume")
        assert asked == [False, True, True]  # the resume took it from the checkpoint
        assert capsys.readouterr().out.count("note: --deterministic changes nothing on a CPU") == 2
        assert not torch.are_deterministic_algorithms_enabled()  # on a CPU: off
        assert hardware.set_determinism(True, "cuda") and torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not hardware.set_determinism(False, "cuda") and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if workspace is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
    plain, det = (checkpoint.load(tmp_path / d / "ckpt.pt") for d in ("plain", "det"))
    assert det["config"]["deterministic"] is True and plain["config"]["deterministic"] is False
    for name, tensor in plain["model"].items():
        assert torch.equal(tensor, det["model"][name]), name


def test_a_resume_on_another_number_of_processes_draws_fresh_batches_not_the_first_ones(capsys):
    """A checkpoint of 1 process resumed by 2 cannot take back its RNG states: each rank draws its
    batches (and dropout) from a seed of its own and of the iteration, never the --seed + rank that
    the run's first steps drew from (which would train on those batches again)."""
    saved = torch.get_rng_state()
    try:
        ckpt = {"rng": {"torch": torch.get_rng_state(), "data": [torch.Generator().manual_seed(7).get_state()],
                        "cuda": []}}
        drawn = {}
        for iter_num in (40, 80):
            for rank in (0, 1):
                gen = torch.Generator().manual_seed(123)
                train.resume_rng(ckpt, rank, 2, iter_num, 1337, gen, master=rank == 0)
                batches, dropout = torch.randint(10**6, (8,), generator=gen), torch.rand(8)
                first = torch.Generator().manual_seed(1337 + rank)  # what the run drew at iteration 0
                assert not torch.equal(batches, torch.randint(10**6, (8,), generator=first)), (iter_num, rank)
                torch.manual_seed(1337 + rank)
                assert not torch.equal(dropout, torch.rand(8)), (iter_num, rank)
                drawn[iter_num, rank] = batches
        assert len({tuple(t.tolist()) for t in drawn.values()}) == 4  # per rank, per iteration
        again = torch.Generator()
        train.resume_rng(ckpt, 1, 2, 40, 1337, again, master=False)  # the same resume: the same batches
        assert torch.equal(torch.randint(10**6, (8,), generator=again), drawn[40, 1])
        assert capsys.readouterr().out.count("the batches are drawn afresh") == 2  # rank 0 only, once a call
    finally:
        torch.set_rng_state(saved)


def test_a_resume_takes_back_the_float16_scaler_and_a_float32_one_starts_fresh():
    """float16's GradScaler state (its scale, lowered at each overflow) is part of exact resume;
    a checkpoint of another dtype saved an empty one, and the resumed scaler keeps its defaults."""
    saved_rng = torch.get_rng_state()
    try:
        model = tiny_model()
        optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
        before = torch.amp.GradScaler("cpu", init_scale=2.0 ** 3, growth_interval=7)  # lowered by overflows
        ckpt = {"optimizer": optimizer.state_dict(), "scaler": before.state_dict(), "iter_num": 12,
                "best_val_loss": 2.5, "rng": {"torch": torch.get_rng_state(), "cuda": [],
                                              "data": [torch.Generator().manual_seed(3).get_state()]}}
        precision = hardware.Precision("cpu", "float16", "test")
        scaler = torch.amp.GradScaler("cpu")
        got = train.resume_state(ckpt, optimizer, scaler, torch.Generator(), precision, 1337, train.Processes(),
                                 Path("ckpt.pt"))
        assert got == (12, 2.5)
        assert scaler.get_scale() == 2.0 ** 3 and scaler.get_growth_interval() == 7
        fresh = torch.amp.GradScaler("cpu", enabled=False)
        train.resume_state({**ckpt, "scaler": fresh.state_dict()}, optimizer, fresh, torch.Generator(),
                           hardware.Precision("cpu", "float32", "test"), 1337, train.Processes(), Path("ckpt.pt"))
        assert not fresh.is_enabled()
    finally:
        torch.set_rng_state(saved_rng)


def test_best_val_loss_is_the_minimum(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=20", "--eval_interval=5", "--learning_rate=3e-2",
              "--lr_decay_iters=20")
    vals = [r["val/loss"] for r in read_metrics(tmp_path / "out") if "val/loss" in r]
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["best_val_loss"] == min(vals)


def test_a_run_that_never_beats_its_first_evaluation_still_leaves_a_checkpoint(tiny_data, tmp_path, capsys):
    """ckpt.pt is written when the val loss improves, and the start's model is never saved: a run
    whose val loss only rose (a learning rate far too high) keeps its last model, and its last
    line says so instead of naming a checkpoint that was never written."""
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=4", "--learning_rate=3", "--optimizer=adamw",
              "--always_save_checkpoint=False", "--warmup_iters=0", "--decay_lr=False")
    vals = [r["val/loss"] for r in read_metrics(out) if "val/loss" in r]
    assert len(vals) == 2 and vals[1] > vals[0]  # it got worse
    saved = checkpoint.load(out / "ckpt.pt")
    assert saved["iter_num"] == 4 and saved["best_val_loss"] == vals[0]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "never went below" in last and "last model" in last and str(out / "ckpt.pt") in last
    run_train(tiny_data, out, "--max_iters=6", "--init_from=resume")  # it resumes like any checkpoint
    assert [r["iter"] for r in read_metrics(out) if "val/loss" in r] == [0, 4, 6]


def test_runs_that_train_nothing_say_so(tiny_data, tmp_path, capsys):
    """--max_iters=0 trains and saves nothing, and says so (the start's evaluation only); a
    resume already past --max_iters says how far the checkpoint is; neither claims a checkpoint."""
    run_train(tiny_data, tmp_path / "zero", "--max_iters=0", "--warmup_iters=0", "--eval_at_start=False")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: --max_iters=0, nothing trained or saved")
    assert not (tmp_path / "zero").exists()  # it wrote nothing, so the folder it made is gone
    run_train(tiny_data, tmp_path / "out", "--max_iters=4", "--eval_interval=2")
    capsys.readouterr()
    (tmp_path / "out" / "loss.png").unlink()  # a run killed between its save and its drawing: the curve is behind
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--max_iters=2")
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "done: nothing to train, the checkpoint is already at iteration 4 (raise --max_iters above it to go on)")
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0  # drawn again from metrics.jsonl


def test_eval_only_evaluates_the_checkpoint_and_leaves_the_run_as_it_was(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=2")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.lock"}
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--eval_only=True")
    printed = capsys.readouterr().out
    best = checkpoint.load(out / "ckpt.pt")["best_val_loss"]
    assert "step 4: train loss" in printed and f"val loss {best:.4f}" in printed  # the saved model, evaluated
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.lock"} == files


def test_a_stop_with_patience_before_any_best_was_saved_saves_the_run(tiny_data, tmp_path, capsys):
    """--patience keeps ckpt.pt as the best model: a Ctrl-C before the first improving save has no
    best to keep, so it saves the run, as without patience, and says so (not "kept ckpt.pt")."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StopRequest, "requested", ctrl_c_at_check(0))  # before the first step
        with pytest.raises(SystemExit):
            run_train(tiny_data, out, "--max_iters=10", "--eval_interval=5", "--patience=2")
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 0
    assert "saved iteration 0 to" in capsys.readouterr().err


def test_a_stop_with_patience_replaces_an_earlier_stops_checkpoint(tiny_data, tmp_path, capsys):
    """A checkpoint saved at a Ctrl-C is no best model: a resumed run stopped again before any
    evaluation saves its progress over it, rather than "keeping the best" and losing the steps."""
    out = tmp_path / "out"
    for expected in (2, 4):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train.StopRequest, "requested", ctrl_c_at_check(2))
            with pytest.raises(SystemExit):
                run_train(tiny_data, out, "--max_iters=50", "--eval_interval=40", "--patience=2",
                          *(["--init_from=resume"] if expected == 4 else []))
        saved = checkpoint.load(out / "ckpt.pt")
        assert saved["iter_num"] == expected and not saved["holds_best"]
        assert saved["best_iter"] == 0  # the best val loss so far is the untrained model's, at iteration 0
        assert f"saved iteration {expected} to" in capsys.readouterr().err


def test_patience_says_when_the_best_was_the_untrained_model(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=40", "--eval_interval=2", "--patience=1", "--learning_rate=3",
              "--optimizer=adamw", "--warmup_iters=0", "--decay_lr=False")
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("stopped at iteration 2; the best was the first evaluation's" in line for line in lines), lines
    assert "never went below the first evaluation's" in lines[-1]
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 2


def test_a_new_run_sets_aside_the_metrics_of_one_that_saved_no_checkpoint(tiny_data, tmp_path, capsys):
    """kill -9 before the first save leaves metrics.jsonl and no ckpt.pt: the next run in that
    folder starts its own record, the old one kept beside it."""
    out = tmp_path / "out"
    out.mkdir()
    dead = '{"iter": 0, "train/loss": 9.0}\n{"iter": 1, "train/loss": 9.0}\n'
    (out / "metrics.jsonl").write_text(dead, encoding="utf-8")
    run_train(tiny_data, out, "--max_iters=3", "--eval_interval=3")
    assert "moved to metrics.earlier.jsonl" in capsys.readouterr().out
    assert (out / "metrics.earlier.jsonl").read_text(encoding="utf-8") == dead
    train_iters = [r["iter"] for r in read_metrics(out) if "train/loss" in r and "val/loss" not in r]
    assert train_iters == list(range(3)) and 9.0 not in [r.get("train/loss") for r in read_metrics(out)]


def test_a_resume_after_a_lost_stretch_does_not_repeat_its_iterations_in_metrics(tiny_data, tmp_path, capsys):
    """kill -9 after the last save: metrics.jsonl holds records of steps the checkpoint does not
    have; the resume leaves them out and writes its own, so every iteration appears once."""
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=2")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # what a killed continuation logged
        for record in ({"iter": 4, "train/loss": 9.0}, {"iter": 5, "train/loss": 9.0}, {"iter": 6, "val/loss": 9.0}):
            f.write(json.dumps(record) + "\n")
        f.write('{"iter": 7, "train/lo')  # killed mid-write
    before = (out / "metrics.jsonl").read_bytes()
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=4")  # nothing to train: the record stays
    assert (out / "metrics.jsonl").read_bytes() == before
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=6")
    assert ("3 records after iteration 4 (not in the checkpoint) and 1 unreadable line (cut short or damaged) "
            "moved to metrics.before_resume.jsonl") in \
        capsys.readouterr().out
    assert len((out / "metrics.before_resume.jsonl").read_text(encoding="utf-8").splitlines()) == 4  # kept aside
    records = read_metrics(out)
    assert 9.0 not in [r.get("train/loss", r.get("val/loss")) for r in records]
    train_iters = [r["iter"] for r in records if "train/loss" in r and "val/loss" not in r]
    assert train_iters == sorted(set(train_iters)) == list(range(6))


def test_a_decay_cut_short_by_max_iters_gets_a_note(tiny_data, tmp_path, capsys):
    run_train(tiny_data, tmp_path / "a", "--max_iters=3", "--lr_decay_iters=100", "--warmup_iters=1")
    assert "pass --lr_decay_iters=3 to decay over the whole run" in capsys.readouterr().out
    run_train(tiny_data, tmp_path / "b", "--max_iters=3", "--lr_decay_iters=3", "--warmup_iters=1")
    assert "note: the learning rate decays" not in capsys.readouterr().out


def test_eval_train_false_evaluates_only_the_val_split(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "both", "--max_iters=4", "--eval_interval=2")
    run_train(tiny_data, tmp_path / "val", "--max_iters=4", "--eval_interval=2", "--eval_train=false")
    both, val = ([r for r in read_metrics(tmp_path / d) if "val/loss" in r] for d in ("both", "val"))
    assert all("train/loss" in r for r in both) and not any("train/loss" in r for r in val)
    assert [r["val/loss"] for r in val] == [r["val/loss"] for r in both]  # the same val batches
    assert (tmp_path / "val" / "loss.png").stat().st_size > 0


def test_wandb_offline_summary_holds_losses(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    summaries = []
    finish = train.MetricsLog.finish

    def finish_and_keep_summary(self):  # read the real run's summary just before it closes
        summaries.append(dict(self.wandb_run.summary))
        finish(self)

    monkeypatch.setattr(train.MetricsLog, "finish", finish_and_keep_summary)
    from wandb.sdk.wandb_run import Run  # (wandb.Run only in later versions than the 0.17 floor)
    defined, define = [], Run.define_metric  # a spy on the real run's method: charts by iteration

    def define_and_note(self, name, *args, **kwargs):
        defined.append((name, kwargs.get("step_metric")))
        return define(self, name, *args, **kwargs)

    monkeypatch.setattr(Run, "define_metric", define_and_note)
    run_train(tiny_data, tmp_path / "out", "--max_iters=4", "--eval_interval=2", "--wandb_log=true",
              "--wandb_project=test")
    assert ("*", "iter") in defined  # every metric's x-axis is the record's iteration, not the log call
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run's file
    summary = summaries[0]
    last_eval = [r for r in read_metrics(tmp_path / "out") if "val/loss" in r][-1]
    assert summary["val/loss"] == pytest.approx(last_eval["val/loss"])
    assert summary["train/loss"] == pytest.approx(last_eval["train/loss"])
    last_step = [r for r in read_metrics(tmp_path / "out") if "val/loss" not in r][-1]
    assert summary["train/batch_loss"] == pytest.approx(last_step["train/loss"])  # a batch's: its own name
    # a resume continues the same wandb run (its id kept in the checkpoint), as metrics.jsonl continues
    run_id = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["wandb_run"]["id"]
    assert run_id and list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--max_iters=6", "--eval_interval=2",
              "--wandb_log=true", "--wandb_project=test")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["wandb_run"]["id"] == run_id
    runs = [p.name.rsplit("-", 1)[1] for p in (tmp_path / "out" / "wandb").glob("offline-run-*")]
    assert runs == [run_id, run_id]  # (offline: a folder for each process, one run id to sync them into)
    # an --eval_only reads the run, it does not log into it; a copy of the folder is another run
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--eval_only=True", "--wandb_log=true",
              "--wandb_project=test")
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    run_train(tiny_data, tmp_path / "copy", "--init_from=resume", "--max_iters=8", "--eval_interval=2",
              "--wandb_log=true", "--wandb_project=test")
    ids = [p.name.rsplit("-", 1)[1] for p in (tmp_path / "out" / "wandb").glob("offline-run-*")]
    assert ids.count(run_id) == 2 and len(ids) == 3
    copy_id = torch.load(tmp_path / "copy" / "ckpt.pt", weights_only=False)["wandb_run"]["id"]
    assert copy_id != run_id


def test_gradient_accumulation_is_split_across_processes_or_the_fix_is_named():
    TrainConfig = training.TrainConfig
    procs = train.Processes(True, 0, 0, 4)
    assert train.micro_steps(TrainConfig(gradient_accumulation_steps=8), procs) == 2
    with pytest.raises(UserError, match=r"--gradient_accumulation_steps \(5\) must be a multiple of the number "
                                        r"of processes \(4\).*; pass --gradient_accumulation_steps=8$"):
        train.micro_steps(TrainConfig(gradient_accumulation_steps=5), procs)
    with pytest.raises(UserError, match="pass --gradient_accumulation_steps=4$"):
        train.micro_steps(TrainConfig(gradient_accumulation_steps=1), procs)


def test_a_rank_that_died_under_torchrun_is_one_line(tiny_data, tmp_path, monkeypatch):
    """kill -9 of one rank: gloo raises on the others mid-collective; that is one line saying the
    checkpoint is intact and how to go on, not gloo's traceback."""
    def peer_died(cfg, explicit, held):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:29500")
    monkeypatch.setattr(train, "run", peer_died)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"^another process of this torchrun job is gone \(.*Connection closed by "
                                        r"peer.*\); what was saved in .* is intact: start the job again with --init_from=resume$"):
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY])
    assert train.peer_lost_reason(RuntimeError(  # gloo's own words, in short: no source path, its first sentence
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:60079: Connection reset by "
        "peer. This is typically caused by a remote peer that crashed")) == (
        "Read error [127.0.0.1]:60079: Connection reset by peer.")
    assert train.peer_lost_reason(RuntimeError("x" * 300 + " Broken pipe")) == "x" * 157 + " ..."
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # not under torchrun: not this case
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY])


def test_a_user_error_under_torchrun_is_one_whole_line_per_rank(monkeypatch, capsys):
    """Every rank of a job says the same mistake: each in one write (no rank cuts into another's
    line), the others' marked with their rank."""
    from errors import run_main

    def mistaken(argv):
        raise UserError("--warmup_iters (100) is longer than the run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("0", "error: "), ("1", "rank 1: error: ")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            run_main(mistaken)
        assert capsys.readouterr().err == expected + "--warmup_iters (100) is longer than the run\n"


def test_a_compile_that_cannot_build_is_one_line(tiny_data, tmp_path, monkeypatch):
    """--compile without a working C++ compiler: torch's hundreds of lines become one that says
    what failed and the way on (train without --compile)."""
    from torch._dynamo.exc import BackendCompilerFailed

    def no_compiler(cfg, explicit, held):
        raise BackendCompilerFailed(lambda: None, RuntimeError(
            "InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')"), None)
    monkeypatch.setattr(train, "run", no_compiler)
    with pytest.raises(UserError, match=r"^--compile could not build the model's kernels \(.*No working C\+\+ "
                                        r"compiler found.*\); train without --compile"):
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--compile"])
    def msvc_without_english(cfg, explicit, held):  # torch on Windows refuses MSVC without its English pack
        raise BackendCompilerFailed(lambda: None, RuntimeError(
            "Torch.compile() is only support MSVC with English language pack,Please re-install its language pack."),
            None)
    monkeypatch.setattr(train, "run", msvc_without_english)
    with pytest.raises(UserError, match=r"^--compile could not build the model's kernels \(.*English language pack"):
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--compile"])

    def model_bug(cfg, explicit, held):  # a failure under compile that is no missing compiler: shown whole
        raise BackendCompilerFailed(lambda: None, RuntimeError("TorchRuntimeError: shapes do not match"), None)
    monkeypatch.setattr(train, "run", model_bug)
    with pytest.raises(BackendCompilerFailed):
        train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--compile"])


def test_a_path_in_a_suggested_command_is_quoted_where_it_holds_a_space(tmp_path):
    """A path in a command a message suggests pastes whole into a shell: in quotes with a space."""
    import dataset
    import hf_format
    import loading
    import sample
    from config import parse_config
    from errors import quoted
    assert quoted("out-a") == "out-a" and quoted("my runs/a") == '"my runs/a"'
    spaced = tmp_path / "my runs"
    (spaced / "run").mkdir(parents=True)
    (spaced / "run" / "ckpt.pt").write_bytes(b"")
    (spaced / "hf").mkdir()
    for name in ("config.json", "model.safetensors"):
        (spaced / "hf" / name).write_text("{}")
    (spaced / "train_config.py").write_text(f"out_dir = {str(spaced / 'run')!r}\nn_layer = 2\nn_head = 2\n"
                                            f"n_embd = 64\nlearning_rate = 1e-3\n", encoding="utf-8")
    for call, command in (
            (lambda: dataset.Dataset(str(spaced), "nope"), f'--name nope --data_dir "{spaced}"'),
            (lambda: hf_format.gpt_config(spaced / "run"), f'pass it as --out_dir="{spaced / "run"}"'),
            (lambda: loading.check_not_an_export(spaced / "hf"), f'--init_from="{spaced / "hf"}" where'),
            (lambda: parse_config(sample.SampleConfig, [str(spaced / "train_config.py")]),
             f'pass --out_dir="{spaced / "run"}" instead of the file')):
        with pytest.raises(UserError) as e:
            call()
        assert command in str(e.value)


def test_a_dataset_beside_the_scripts_is_named_when_run_from_another_folder(tmp_path, monkeypatch):
    """`cd /tmp && python ~/nanogpt/train.py ...`: data/ is read from the current folder; the
    message says so and where the dataset is (it said to prepare it again)."""
    import dataset
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    write_char_dataset(repo / "data", "hello world " * 20, name="mine")
    elsewhere.mkdir()
    monkeypatch.setattr(dataset, "HERE", repo)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError) as e:
        dataset.Dataset("data", "mine")
    assert str(e.value) == (f"dataset 'mine' not found in {elsewhere / 'data' / 'mine'} (--data_dir is read from the "
                            f"current folder, {elsewhere}); it is in {repo / 'data' / 'mine'}: pass "
                            f"--data_dir={repo / 'data'} or run from {repo}")
    assert dataset.Dataset(str(repo / "data"), "mine").meta["vocab_size"] > 0


def test_a_half_precision_the_cpu_lacks_is_honoured_but_called_slower():
    """--dtype=float16 on a CPU without float16 units (nanoGPT ignores it there): it runs, and
    the precision line says it is emulated (it was 4x slower than float32, silently)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("torch tells an x86 CPU's half-precision units only")
    emulated = "(as requested; this CPU has no float16 units: emulated, slower than --dtype=auto)"
    reason = hardware.resolve("cpu", "float16").reason
    assert (emulated in reason) != hardware._cpu_supports("_is_amx_fp16_supported")
    assert hardware.resolve("cpu", "float32").reason.endswith("dtype float32 (as requested)")
    assert ("emulated" in hardware.resolve("cpu", "bfloat16").reason) != hardware.cpu_has_native_bf16()


def test_the_done_line_says_when_the_checkpoint_is_not_the_best(tiny_data, tmp_path, capsys, monkeypatch):
    """--always_save_checkpoint (the default, as nanoGPT's) saves at every evaluation: when the
    last is worse than the best, the done line says that ckpt.pt holds the last model (it read as
    if it held the best); keeping only the best, it holds the best and says nothing more."""
    for always, expected in ((True, "done: 6 iterations, best val loss 2.0000, checkpoint in {} (the last model, "
                                    "val loss 2.5000: every evaluation saves; --always_save_checkpoint=false keeps "
                                    "the best)"),
                             (False, "done: 6 iterations, best val loss 2.0000, checkpoint in {}")):
        losses = iter([3.0, 2.0, 2.5, 2.5])
        monkeypatch.setattr(train, "estimate_loss", lambda *args: {"val": next(losses)})
        out = tmp_path / f"out-{always}"
        train.main([f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=6", "--eval_interval=2",
                    "--eval_at_start=false", f"--always_save_checkpoint={always}"])
        assert capsys.readouterr().out.strip().splitlines()[-1] == expected.format(out / "ckpt.pt")
        assert checkpoint.load(out / "ckpt.pt")["iter_num"] == (6 if always else 4)


def test_lr_schedule():
    cfg = training.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert training.get_lr(0, cfg) == pytest.approx(1 / 11)
    assert training.get_lr(10, cfg) == pytest.approx(1.0)
    assert training.get_lr(60, cfg) == pytest.approx(0.55)
    assert training.get_lr(110, cfg) == pytest.approx(0.1)
    assert training.get_lr(150, cfg) == pytest.approx(0.1)
    # a warmup that ends where the decay does: min_lr from there (it gave learning_rate at that step)
    cfg = training.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=100, lr_decay_iters=100, max_iters=100)
    assert [training.get_lr(i, cfg) for i in (99, 100, 101)] == [pytest.approx(100 / 101), 0.1, 0.1]


def test_a_short_try_of_a_long_warmup_runs_and_says_so(tiny_data, tmp_path, capsys):
    """nanoGPT's habit `python train.py --max_iters=50` under a 2,000-step warmup: it runs (it
    was refused), with a note on how far the learning rate gets and how to reach it."""
    train.main([f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=20",
                "--warmup_iters=2000", "--lr_decay_iters=5000", "--eval_interval=20"])
    out = capsys.readouterr().out
    assert ("note: --warmup_iters (2000) is longer than the run (--max_iters=20): the learning rate only climbs to "
            "6.00e-06, not --learning_rate=6.00e-04; pass --warmup_iters=2 to reach it") in out
    assert "decays until" not in out  # one note, the one that matters
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["iter_num"] == 20


def test_runs_under_torchrun_with_ddp(tiny_data, tmp_path, capsys):
    """The same train.py under torchrun: two CPU processes (gloo), then a resume. (AdamW under
    torchrun, with a stop and an exact resume, is in test_distributed.py.)"""
    import subprocess
    args = [str(ROOT / "train.py"), f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}"]
    first = subprocess.run(torchrun(tmp_path / "logs1", *args, *TINY, "--max_iters=4", "--eval_interval=2",
                                    "--lr_decay_iters=6", "--gradient_accumulation_steps=2", "--optimizer=muon"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:] + rank_output(tmp_path / "logs1")
    second = subprocess.run(torchrun(tmp_path / "logs2", *args, "--init_from=resume", "--max_iters=6"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:] + rank_output(tmp_path / "logs2")
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]["data"]) == 2  # one data sampler per rank
    assert ckpt["config"]["gradient_accumulation_steps"] == 2  # saved as the global setting
    assert ckpt["config"]["optimizer"] == "muon" and "muon" in ckpt["optimizer"]
    # the same run continued by one process: the model and optimizer go on, the two samplers cannot
    train.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={tiny_data}", "--init_from=resume", "--max_iters=8"])
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "out" / "ckpt.pt")["iter_num"] == 8


def test_a_resume_on_changed_data_starts_its_best_afresh_and_saves(tiny_data, tmp_path, shakespeare_text, capsys):
    """A resume on another dataset (task A, then task B), or on a dataset prepared again under
    its name, does not compare its val losses with the checkpoint's best, measured on other
    text (a low one would keep every new model unsaved): a note says so and the first
    evaluation saves. The same data: no note, the best kept."""
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=false")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    ckpt["best_val_loss"] = 0.01  # task A was learnt to a tiny loss
    torch.save(ckpt, out / "ckpt.pt")
    write_char_dataset(tiny_data, shakespeare_text[:60_000][::-1], name="other")  # the same characters
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--dataset=other", "--max_iters=6")
    text = capsys.readouterr().out
    assert "note: the dataset is 'other', the checkpoint's was 'tiny'; its best val loss 0.0100 was measured " \
           "on other text" in text
    saved = torch.load(out / "ckpt.pt", weights_only=False)
    assert saved["iter_num"] == 6 and saved["config"]["dataset"] == "other" and saved["best_val_loss"] > 0.01

    lines = shakespeare_text[:60_000].split("\n")
    write_char_dataset(tiny_data, "\n".join(lines[::-1]), name="other")  # prepared again, from other text
    run_train(tiny_data, out, "--init_from=resume", "--dataset=other", "--max_iters=8")
    assert "dataset 'other' was prepared again since the checkpoint" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter_num"] == 8
    run_train(tiny_data, out, "--init_from=resume", "--dataset=other", "--max_iters=10")
    assert "was measured on other text" not in capsys.readouterr().out  # the same data: nothing to say


def test_a_resume_that_never_beats_the_best_says_its_work_was_not_saved(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=false")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    ckpt["best_val_loss"] = 0.01  # a best no later model beats
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=6")
    assert (f"never went below the checkpoint's best 0.0100, so {out / 'ckpt.pt'} still holds iteration 4's model "
            f"and iterations 5-6 were not saved (--always_save_checkpoint=true keeps") in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter_num"] == 4
    run_train(tiny_data, out, "--init_from=resume", "--max_iters=8", "--patience=5")
    assert "iterations 5-8 were not saved (with --patience ckpt.pt keeps the best model)" in capsys.readouterr().out


def test_a_bigram_table_larger_than_the_model_is_said(tmp_path, capsys):
    """A CPU recipe (bigram on) on a 1,000-token BPE vocabulary built a table 100x its model,
    GBs of memory, while the parameter line said 1.96M: the line adds the lookup tables when
    they outweigh the rest, and a note names the table and --bigram=False."""
    import numpy as np
    from conftest import write_token_dataset
    rng = np.random.default_rng(0)
    write_token_dataset(tmp_path / "data", "wide", rng.integers(0, 300, 4000), rng.integers(0, 300, 400))
    run_train(tmp_path / "data", tmp_path / "out", "--dataset=wide", "--bigram=True", "--max_iters=1")
    out = capsys.readouterr().out
    assert "number of parameters: 0.03M (and 2.89M in lookup tables)" in out
    assert "note: the bigram table alone holds 2.89M parameters (301 x 300 rows of 32)" in out
    assert "x the rest of the model; with its gradients and optimizer state it takes ~44 MB: --bigram=False drops it" in out
    run_train(tmp_path / "data", tmp_path / "out2", "--dataset=wide", "--bigram=False", "--max_iters=1")
    out = capsys.readouterr().out
    assert "bigram table" not in out and "lookup tables" not in out
    # a recipe's bigram (its config file sets it, for char data) is refused where the table dwarfs the
    # model, before the table is built; --bigram=True on the command line keeps it
    (tmp_path / "recipe.py").write_text("bigram = True\nn_layer = 2\nn_embd = 32\nn_head = 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^the config file's bigram = True adds a table of 3M parameters on dataset "
                                        r"'wide' \(a vocabulary of 300 tokens\), about 85x the rest of the model "
                                        r"\(~44 MB .*\): pass --bigram=False, or --bigram=True to keep it$"):
        run_train(tmp_path / "data", tmp_path / "out3", str(tmp_path / "recipe.py"), "--dataset=wide", "--max_iters=1")
    assert not (tmp_path / "out3").exists()
    run_train(tmp_path / "data", tmp_path / "out3", str(tmp_path / "recipe.py"), "--dataset=wide", "--max_iters=1",
              "--bigram=True")
    assert "note: the bigram table alone holds 2.89M parameters" in capsys.readouterr().out


def test_a_char_model_refuses_records_naming_their_boundary_token(tiny_data, tmp_path):
    """A char model of plain text finetuned on documents of its own characters: their boundary
    token has no id in the model, and the message says so (not only "66 tokens, more than 65")."""
    import numpy as np
    from conftest import write_token_dataset
    run_train(tiny_data, tmp_path / "base", "--max_iters=2")
    meta = json.loads((tiny_data / "tiny" / "meta.json").read_text())
    n = len(meta["chars"])
    ids = np.fromfile(tiny_data / "tiny" / "val.bin", dtype=np.uint16)[:600]
    ids[::50] = n  # documents, each after its boundary token
    write_token_dataset(tiny_data, "docs", ids, ids, chars=meta["chars"], vocab_size=n + 1, eot_id=n, documents="line")
    with pytest.raises(UserError, match=f"has {n + 1} tokens, more than the {n} of --init_from=.*: its documents' "
                                        "boundary token, which a model trained on plain text has no id for"):
        run_train(tiny_data, tmp_path / "ft", f"--init_from={tmp_path / 'base'}", "--dataset=docs", "--max_iters=1")


def test_a_stop_before_anything_was_logged_draws_no_curve_and_warns_of_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StopRequest, "requested", ctrl_c_at_check(0))
        with pytest.raises(SystemExit):
            run_train(tiny_data, out, "--max_iters=10", "--eval_at_start=false")
    captured = capsys.readouterr()
    assert "saved iteration 0 to" in captured.err
    assert "warning" not in captured.out + captured.err and not (out / "loss.png").exists()


def test_a_checkpoint_from_before_fingerprints_resumed_on_another_dataset_starts_its_best_afresh(
        tiny_data, tmp_path, shakespeare_text, capsys):
    """A checkpoint written before checkpoints held the data's fingerprint, resumed on another
    dataset: told by the dataset's name, its best val loss (of other text) is set aside and the
    first evaluation saves; resumed on its own dataset, the best is kept."""
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=false")
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    del ckpt["data_fingerprint"]  # as written before fingerprints
    ckpt["best_val_loss"] = 0.01
    torch.save(ckpt, out / "ckpt.pt")
    write_char_dataset(tiny_data, shakespeare_text[:60_000][::-1], name="other")
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--dataset=tiny", "--max_iters=6")
    assert "measured on other text" not in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter_num"] == 4  # the best kept: nothing beat it
    run_train(tiny_data, out, "--init_from=resume", "--dataset=other", "--max_iters=8")
    assert "note: the dataset is 'other', the checkpoint's was 'tiny'; its best val loss 0.0100 was measured " \
           "on other text" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter_num"] == 8
    run_train(tiny_data, out, "--init_from=resume", "--dataset=tiny", "--eval_only=True")  # reads, saves nothing
    assert "measured on other text" not in capsys.readouterr().out


def test_a_bigram_table_smaller_than_the_model_is_not_noted(tiny_data, tmp_path, capsys):
    """A char model with the bigram table (where it pays: V x V x n_embd smaller than the blocks):
    the parameter line is nanoGPT's count alone and no note about the table's size."""
    run_train(tiny_data, tmp_path / "out", "--bigram=True", "--n_layer=4", "--n_head=4", "--n_embd=128",
              "--max_iters=1")
    out = capsys.readouterr().out
    assert re.search(r"number of parameters: [0-9.]+M\n", out)
    assert "bigram table" not in out and "lookup tables" not in out


def test_the_data_fingerprint_tells_what_the_data_is_not_where_it_lies(tmp_path, shakespeare_text):
    """Dataset.fingerprint, by which a resume tells its data changed: the same data prepared
    under another name or folder has the same one; a change at the end of the train split, in
    the val split, or in a source's sha256 gives another."""
    import dataset

    def fingerprint(text: str, name: str, sha: str = "abc") -> str:
        folder = write_char_dataset(tmp_path / name, text, name=name)
        meta = json.loads((folder / "meta.json").read_text())
        meta["sources"] = [{"path": str(folder / "input.txt"), "bytes": len(text), "sha256": sha}]
        (folder / "meta.json").write_text(json.dumps(meta))
        data = dataset.Dataset(str(tmp_path / name), name)
        try:
            return data.fingerprint()
        finally:
            for f in data.files.values():
                f.close()

    text = shakespeare_text[:200_000]  # train.bin 360 KB: its middle is not read, its ends are
    n = int(len(text) * 0.9)
    swap = {"e": "a", "a": "e"}

    def changed(at: int) -> str:
        return text[:at] + swap.get(text[at], "e") + text[at + 1:]
    base = fingerprint(text, "a")
    assert fingerprint(text, "b") == base  # another folder, another name: the same data
    assert fingerprint(changed(n - 10), "c") != base  # the end of the train split
    assert fingerprint(changed(len(text) - 10), "d") != base  # the val split
    assert fingerprint(text, "e", sha="def") != base  # another source text


def test_a_stop_of_a_patience_run_on_changed_data_saves_its_progress(tiny_data, tmp_path, shakespeare_text, capsys):
    """With --patience a stop keeps ckpt.pt when it holds the run's best; a resume on another
    dataset has no best yet (the checkpoint's was of other text), so a Ctrl-C before its first
    evaluation saves the progress on the new data instead of keeping the old task's model."""
    out = tmp_path / "out"
    run_train(tiny_data, out, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=false")
    assert torch.load(out / "ckpt.pt", weights_only=False)["holds_best"]
    write_char_dataset(tiny_data, shakespeare_text[:60_000][::-1], name="other")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StopRequest, "requested", ctrl_c_at_check(2))
        with pytest.raises(SystemExit):
            run_train(tiny_data, out, "--init_from=resume", "--dataset=other", "--max_iters=20", "--eval_interval=10",
                      "--patience=3")
    saved = torch.load(out / "ckpt.pt", weights_only=False)
    assert saved["iter_num"] > 4 and saved["config"]["dataset"] == "other"


def test_a_resume_on_changed_data_of_a_never_evaluated_checkpoint_says_nothing_of_its_best(
        tiny_data, tmp_path, shakespeare_text, capsys):
    """A checkpoint that never evaluated (stopped before it) has no best val loss to set aside: a resume on other
    data prints no note about one (not 'its best val loss inf was measured on other text')."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:  # a Ctrl-C before its first evaluation
        patch.setattr(train.StopRequest, "requested", ctrl_c_at_check(2))
        with pytest.raises(SystemExit):
            run_train(tiny_data, out, "--max_iters=20", "--eval_interval=10", "--eval_at_start=false")
    assert torch.load(out / "ckpt.pt", weights_only=False)["best_val_loss"] == float("inf")
    write_char_dataset(tiny_data, shakespeare_text[:60_000][::-1], name="other")
    capsys.readouterr()
    run_train(tiny_data, out, "--init_from=resume", "--dataset=other", "--max_iters=4", "--eval_interval=100")
    assert "measured on other text" not in capsys.readouterr().out


def test_a_resume_on_another_number_of_cpu_threads_says_it_will_not_match_bit_for_bit(tiny_data, tmp_path, capsys):
    n = torch.get_num_threads()
    run_train(tiny_data, tmp_path / "out", "--max_iters=2")
    capsys.readouterr()
    torch.set_num_threads(n + 1)
    try:
        run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--max_iters=3")
    finally:
        torch.set_num_threads(n)
    text = capsys.readouterr().out
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--eval_only=true")  # trains nothing: no note
    assert "CPU thread" not in capsys.readouterr().out
    assert (f"was trained with {n} CPU thread{'s' if n != 1 else ''}, this run uses {n + 1}: sums add in another order, so the numbers "
            f"from here on will not match an uninterrupted run bit for bit (set the environment variable OMP_NUM_THREADS to "
            f"{n} to match it)") in text
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--max_iters=4")  # saved by n + 1 threads
    assert f"was trained with {n + 1} CPU threads, this run uses {n}" in capsys.readouterr().out
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--max_iters=5")
    assert "CPU threads" not in capsys.readouterr().out


def test_a_lost_peers_reason_is_cut_at_a_word_and_kept_whole_up_to_160_characters():
    assert train.peer_lost_reason(RuntimeError("word " * 60 + "Broken pipe")) == " ".join(["word"] * 31) + " ..."
    exact = "x" * 149 + "Broken pipe"  # 160 characters
    assert train.peer_lost_reason(RuntimeError(exact)) == exact


def test_a_recipes_bigram_false_is_no_refusal_and_a_table_20x_the_model_is_refused(tmp_path):
    (tmp_path / "off.py").write_text("bigram = False\nn_layer = 2\nn_embd = 32\nn_head = 2\n", encoding="utf-8")
    cfg, explicit = config.parse_config(training.TrainConfig, [str(tmp_path / "off.py")])
    assert train.recipe_bigram_too_large(cfg, explicit, 1000) is None
    (tmp_path / "on.py").write_text("bigram = True\nn_layer = 2\nn_embd = 32\nn_head = 2\n", encoding="utf-8")
    cfg, explicit = config.parse_config(training.TrainConfig, [str(tmp_path / "on.py")])
    assert train.recipe_bigram_too_large(cfg, explicit, 20) is None  # a small char vocabulary: where it pays
    assert "about 20x the rest of the model" in train.recipe_bigram_too_large(cfg, explicit, 135)


def test_a_resume_without_wandb_keeps_the_runs_wandb_id_and_eval_only_draws_no_curve(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "out", "--max_iters=2", "--eval_interval=2")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    ckpt["wandb_run"] = {"id": "abc123", "out_dir": str((tmp_path / "out").resolve())}  # as --wandb_log left it
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--max_iters=4", "--eval_interval=2")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["wandb_run"]["id"] == "abc123"
    (tmp_path / "out" / "loss.png").unlink()
    run_train(tiny_data, tmp_path / "out", "--init_from=resume", "--eval_only=True")
    assert not (tmp_path / "out" / "loss.png").exists()  # --eval_only adds nothing to the run's record


def test_a_resume_under_a_recipe_with_bigram_is_not_refused(tmp_path):
    """The refusal is for a new model: a run started with --bigram=True under that recipe resumes
    with the recipe alone (its table is in the checkpoint already)."""
    import numpy as np
    from conftest import write_token_dataset
    rng = np.random.default_rng(0)
    write_token_dataset(tmp_path / "data", "wide", rng.integers(0, 300, 4000), rng.integers(0, 300, 400))
    (tmp_path / "recipe.py").write_text("bigram = True\nn_layer = 2\nn_embd = 32\nn_head = 2\n", encoding="utf-8")
    recipe = [str(tmp_path / "recipe.py"), "--dataset=wide"]
    run_train(tmp_path / "data", tmp_path / "out", *recipe, "--max_iters=1", "--bigram=True")
    run_train(tmp_path / "data", tmp_path / "out", *recipe, "--max_iters=2", "--init_from=resume")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 2
