"""sample.py and generation in model.py: the KV cache, the sliding window, the sampling
settings, streaming, the interactive prompt and the errors a user can run into."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import sample
from conftest import ROOT
from errors import UserError, run_main
import hardware
import template
from generation import GenerationConfig, choose_decoder, encode_prompt, generate_text, shown_prompt
from hardware import Precision
from model import GPT, GPTConfig, KVCache, sample_next
from stopping import StopCondition
from tokenizer import Tokenizer

CHARS = sorted(set("\n !,.:;?abcdefghijklmnopqrstuvwxyzAEMOR"))
BLOCK = 8


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    args = dict(block_size=BLOCK, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    return GPT(GPTConfig(**args)).eval(), args


def save_ckpt(out_dir, tokenizer: dict, vocab_size: int, prefix: str = ""):
    model, args = tiny_model(vocab_size)
    checkpoint.save({
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "model_args": args, "optimizer": {}, "iter_num": 0, "best_val_loss": 9.9,
        "config": {}, "tokenizer": tokenizer}, out_dir / "ckpt.pt")
    return str(out_dir)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    desc = {"name": "char", "vocab_size": len(CHARS), "eot_id": None, "chars": CHARS}
    # saved with a compiled model's key prefix: sample.py strips it
    return save_ckpt(tmp_path_factory.mktemp("char"), desc, len(CHARS), prefix="_orig_mod.")


@pytest.fixture(scope="module")
def gpt2():
    try:
        return Tokenizer.tiktoken("gpt2")
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, gpt2):
    return save_ckpt(tmp_path_factory.mktemp("bpe"), gpt2.describe(), gpt2.vocab_size)


def run(argv, capsys) -> str:
    """sample.main(argv) in this process; its standard output."""
    sample.main(argv)
    return capsys.readouterr().out


def run_cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, **kwargs)


def test_a_c_locale_without_utf8_mode_still_says_the_error_and_its_path(tmp_path):
    """LC_ALL=C with PYTHONUTF8=0: a non-ASCII path reaches Python as undecodable bytes; the one
    error line still prints, with the path as given, instead of an encoding traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LANG")}
    missing = str(tmp_path / "nö such").encode("utf-8")
    done = subprocess.run([sys.executable.encode(), b"sample.py", b"--out_dir=" + missing], cwd=ROOT,
                          capture_output=True, timeout=120, env={**env, "LC_ALL": "C", "PYTHONUTF8": "0",
                                                                 "PYTHONCOERCECLOCALE": "0"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(b"error: no checkpoint at " + missing), done.stderr


def test_a_prompt_typed_under_a_c_locale_is_the_text_typed():
    """LC_ALL=C without UTF-8 mode: Python hands "café" over as "caf" and two lone surrogates;
    sample.py reads the UTF-8 they were (a prompt and a --stop string alike)."""
    assert sample.typed("caf\udcc3\udca9") == "café" and sample.typed("plain") == "plain"
    assert sample.read_prompt("caf\udcc3\udca9") == "café"


def test_interactive_with_stdin_closed_ends_quietly(char_dir):
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" sample.py --out_dir="{char_dir}" --interactive <&-'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------- model.py

def test_cache_and_no_cache_agree_greedily_past_three_block_sizes():
    model, _ = tiny_model(len(CHARS))
    for prompt_len in (3, 2 * BLOCK + 1):  # a short prompt, and one longer than block_size
        idx = torch.randint(0, len(CHARS), (2, prompt_len))
        n_new = 3 * BLOCK + 5
        cached = model.generate(idx, n_new, temperature=0, use_cache=True)
        uncached = model.generate(idx, n_new, temperature=0, use_cache=False)
        assert cached.shape == (2, prompt_len + n_new)
        assert torch.equal(cached, uncached)
        assert torch.equal(model.generate(idx, n_new, temperature=0), cached)  # greedy is deterministic


def test_kv_cache_writes_in_place():
    model, _ = tiny_model(len(CHARS))
    cache = KVCache(model.config.n_layer, BLOCK)
    model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    buffer = cache.k[0].data_ptr()
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    assert cache.length == 4 and cache.k[0].data_ptr() == buffer
    full, _ = model(torch.zeros(1, 4, dtype=torch.long))
    torch.testing.assert_close(logits, full)


def test_sampling_settings():
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), greedy)
    assert torch.equal(sample_next(logits, temperature=1e-30), greedy)  # no inf - inf = nan
    assert torch.equal(sample_next(logits, 1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), greedy)  # the top token always stays

    def draw(**kw):
        return sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(draw(top_k=1000), draw(top_k=None))  # clamped to the vocabulary
    assert torch.equal(draw(top_k=0), draw(top_k=None))  # 0 is off
    assert torch.equal(draw(top_p=1.0), draw())
    # top_k=3: only the three most likely tokens ever come out
    top3 = logits.topk(3).indices
    for seed in range(20):
        ids = sample_next(logits, 5.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert (top3 == ids[:, None]).any(dim=1).all()


def test_every_impossible_generation_setting_is_named_at_once():
    bad = GenerationConfig(num_samples=0, max_new_tokens=-1, temperature=float("inf"), top_k=-1, top_p=0.0,
                           min_p=1.5, repetition_penalty=0.0, stop=["END", ""], fast_weights="int4")
    assert bad.problems() == [
        "--num_samples must be at least 1, got 0",
        "--max_new_tokens must be >= 0, got -1",
        "--temperature must be a finite number >= 0 (0 = greedy), got inf",
        "--top_k must be >= 0 (0 = off), got -1",
        "--top_p must be in (0, 1] (1 = off), got 0.0",
        "--min_p must be in [0, 1] (0 = off), got 1.5",
        "--repetition_penalty must be a finite number above 0 (1 = off), got 0.0",
        "--stop needs a non-empty string, e.g. --stop=END",
        "--fast_weights must be auto, float32 or int8, got 'int4'"]
    nan = float("nan")
    assert len(GenerationConfig(temperature=nan, top_p=nan, min_p=nan, repetition_penalty=float("inf")).problems()) == 4
    assert len(GenerationConfig(temperature=-0.1, top_p=1.01, min_p=-0.01).problems()) == 3
    for edge in (dict(num_samples=1, max_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, min_p=1.0,
                      repetition_penalty=0.5, stop=["x"], fast_weights="int8"),
                 dict(top_k=None, top_p=1e-9, min_p=0.0, repetition_penalty=2.0, fast_weights="float32"), {}):
        assert GenerationConfig(**edge).problems() == [], edge


def test_a_prompt_becomes_the_ids_the_model_continues_from():
    char = Tokenizer.char_from_text("ab\n")
    assert encode_prompt(char, "ba", False) == char.encode("ba")
    docs = Tokenizer.char_from_text("ab\n", documents="line")
    ids = encode_prompt(docs, "\n\nab\n", False)  # a new document: its line ends dropped (line mode has none)
    assert ids == [docs.eot_id] + docs.encode("ab")
    assert shown_prompt(docs, ids + [docs.vocab_size]) == docs.encode("ab")  # no boundary, no padding id
    blank = Tokenizer.char_from_text("ab\n", documents="blank")  # a document of lines: only leading ones go
    assert encode_prompt(blank, "\nab\n", False) == [blank.eot_id] + blank.encode("ab\n")
    assert encode_prompt(docs, "", False) == [docs.eot_id]
    bpe = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)])
    assert encode_prompt(bpe, "", False) == [bpe.eot_id]  # an empty prompt starts a new document
    with pytest.raises(UserError, match=r"^the prompt is empty; give some text, e.g. --prompt=a$"):
        encode_prompt(char, "", False)
    with pytest.raises(UserError, match="^the prompt has no character the model knows; give some text"):
        encode_prompt(char, "xyz", True)


def test_a_documents_or_instruct_prompt_keeps_its_text_and_drops_unknown_characters():
    docs = Tokenizer.char_from_text("ab\n X", documents="line")
    assert encode_prompt(docs, "\n\n Xa", False) == [docs.eot_id] + docs.encode(" Xa")  # only line ends go
    assert encode_prompt(docs, "\nXa", False) == [docs.eot_id] + docs.encode("Xa")
    assert encode_prompt(docs, "\naz€b", True) == [docs.eot_id] + docs.encode("ab")
    chat = Tokenizer.char_from_text(template.fill(template.TEMPLATE, "user", "hi") + template.TEMPLATE["assistant"],
                                    documents="jsonl")
    ids = encode_prompt(chat, "h€i", True, instruct={"template": template.TEMPLATE})  # a user turn, then the marker
    assert ids == [chat.eot_id] + chat.encode("<|user|>\nhi\n<|assistant|>\n")
    assert encode_prompt(chat, "hi\n", False, instruct={"template": template.TEMPLATE}) == ids  # a file's line end


def test_generate_text_streams_what_the_model_draws_with_these_settings():
    char = Tokenizer.char_from_text(CHARS)
    model, _ = tiny_model(len(CHARS))
    cpu = Precision("cpu", "float32", "float32")
    prompt = char.encode("ab")

    def stream(echo=True, **kw):
        cfg = GenerationConfig(max_new_tokens=12, temperature=0.05, top_k=None, **kw)
        return list(generate_text(model, char, prompt, cfg, cpu, torch.Generator().manual_seed(5), echo))

    def drawn(**kw):  # the model's own draws with the same settings and seed
        tokens = model.generate_stream(torch.tensor([prompt]), 12, temperature=0.05,
                                       generator=torch.Generator().manual_seed(5), **kw)
        return char.decode([int(t) for t in tokens])

    settings = ({}, dict(min_p=0.5), dict(repetition_penalty=1.5))
    assert len({drawn(**kw) for kw in settings}) == 3  # each setting changes the sample
    for kw in settings:
        assert stream(**kw)[-1] == "ab" + drawn(**kw), kw
    assert stream(echo=False)[0] == ""
    text = drawn()
    # the whole sample could start the stop string: held back, then given at the end
    assert stream(stop=[text + "!"]) == ["ab", "ab" + text]
    # prompt ids that end inside a character echo U+FFFD, not an error
    bpe = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)])
    cfg = GenerationConfig(max_new_tokens=0)
    assert list(generate_text(tiny_model(bpe.vocab_size)[0], bpe, list("€".encode()[:2]), cfg, cpu,
                              torch.Generator(), True)) == ["\N{REPLACEMENT CHARACTER}"]



class RecordingDecoder:
    """A decoder that yields the same id for every row and records what generate_text asked of it."""

    def __init__(self, next_id: int):
        self.next_id, self.asked, self.drawn = next_id, [], 0

    def generate_stream(self, idx, max_new_tokens, **settings):
        self.asked.append((tuple(idx.shape), max_new_tokens, settings))
        for _ in range(max_new_tokens):
            self.drawn += 1
            yield torch.full((idx.shape[0],), self.next_id)


def test_generate_text_asks_for_a_batch_with_every_setting_and_stops_once_all_samples_ended():
    docs = Tokenizer.char_from_text("ab", documents="line")
    cpu = Precision("cpu", "float32", "float32")
    ending = RecordingDecoder(docs.eot_id)  # every sample ends at its first token
    cfg = GenerationConfig(num_samples=3, max_new_tokens=50, temperature=0.3, top_k=7, top_p=0.9, min_p=0.1,
                           repetition_penalty=1.3, use_cache=False)
    generator = torch.Generator()
    prompt = encode_prompt(docs, "ab", False)
    assert list(generate_text(ending, docs, prompt, cfg, cpu, generator, True)) == ["ab"]
    assert ending.drawn == 1  # nothing more is drawn once every sample has ended
    assert ending.asked == [((3, 3), 50, dict(temperature=0.3, top_k=7, top_p=0.9, generator=generator,
                                               use_cache=False, min_p=0.1, repetition_penalty=1.3))]
    going = RecordingDecoder(docs.encode("b")[0])
    stop = StopCondition.for_model(docs, 2)
    cfg = GenerationConfig(num_samples=2, max_new_tokens=4)
    assert list(generate_text(going, docs, prompt, cfg, cpu, generator, False, stop))[-1] == "bbbb"
    assert going.drawn == 4 and stop.steps == 4 and [stop.text(b) for b in range(2)] == ["bbbb"] * 2


def test_the_seed_and_an_empty_or_blank_prompt_are_checked_before_any_work():
    assert GenerationConfig(seed=-1).problems() == [hardware.seed_problem(-1)] and hardware.seed_problem(-1)
    no_line_ends = Tokenizer.char_from_text("ab")
    with pytest.raises(UserError, match=r"^the prompt is empty; give some text, e.g. --prompt=a$"):
        encode_prompt(no_line_ends, "", False)  # the example is a character this model knows
    chat = Tokenizer.char_from_text(template.fill(template.TEMPLATE, "user", "hi") + template.TEMPLATE["assistant"],
                                    documents="jsonl")
    with pytest.raises(UserError, match="^the prompt is empty: an instruction model answers"):
        encode_prompt(chat, " \n\n", False, instruct={"template": template.TEMPLATE})


def test_drop_unknown_says_which_characters_it_dropped(capsys):
    char = Tokenizer.char_from_text("ab")
    assert encode_prompt(char, "azb€", True) == char.encode("ab")
    assert capsys.readouterr().err == "note: --drop_unknown dropped 2 character(s) the model never saw: 'z', '€'\n"


def test_on_a_cuda_gpu_decoding_without_the_kv_cache_uses_the_model(monkeypatch):
    """The CUDA graph replays the one-token step of a cache: without a cache, the model decodes."""
    import fast_decode

    def no_graph(*args, **kwargs):
        raise AssertionError("the CUDA graph was built")

    monkeypatch.setattr(fast_decode, "graph_decoder_for", no_graph)
    model, _ = tiny_model(len(CHARS))
    decoder, how = choose_decoder(model, GenerationConfig(use_cache=False), Precision("cuda", "bfloat16", "bf16"))
    assert decoder is model and how == "model.generate_stream (without the KV cache)"

def test_an_exact_dtype_decodes_with_the_model_itself_and_says_so():
    model, _ = tiny_model(len(CHARS))
    decoder, how = choose_decoder(model, GenerationConfig(dtype="float32"), Precision("cpu", "float32", "float32"))
    assert decoder is model and how == "model.generate_stream (exact, as --dtype asked)"
    decoder, how = choose_decoder(model, GenerationConfig(dtype="float32", compile=True),
                                  Precision("cpu", "float32", "float32"))  # compiles on its first steps
    assert decoder is model and how.endswith("asked); the model compiled (torch.compile, on its first steps)")
    decoder, how = choose_decoder(model, GenerationConfig(use_cache=False), Precision("cpu", "float32", "float32"))
    assert decoder is model and how == "model.generate_stream (without the KV cache: the whole context every token)"



# ---------------------------------------------------------------------------- loading.py

def test_auto_on_a_cpu_with_bf16_units_decodes_in_float32_but_an_asked_dtype_stays(monkeypatch):
    """Token-by-token decoding on a CPU is faster without autocast: dtype auto means float32
    there even where hardware.resolve would pick bf16; an explicit --dtype and GPUs keep theirs."""
    import hardware
    import loading

    def resolve(device, dtype):
        chosen = "bfloat16" if dtype == "auto" else dtype
        return hardware.Precision(device, chosen, f"device {device} (as requested), dtype {chosen} (native)")

    monkeypatch.setattr(loading.hardware, "resolve", resolve)
    auto = loading.choose_precision("cpu", "auto")
    assert (auto.device, auto.dtype) == ("cpu", "float32")
    assert auto.reason.startswith("device cpu (as requested), dtype float32 (token-by-token decoding on cpu")
    assert loading.choose_precision("cpu", "bfloat16").dtype == "bfloat16"
    assert loading.choose_precision("cuda", "auto").dtype == "bfloat16"


def test_a_loaded_checkpoint_is_in_eval_mode_with_its_info(tmp_path):
    import loading
    desc = {"name": "char", "vocab_size": len(CHARS), "eot_id": None, "chars": CHARS}
    folder = save_ckpt(tmp_path, desc, len(CHARS))
    model, tokenizer, info = loading.load(folder, "cpu")
    assert not model.training and not any(m.training for m in model.modules())
    assert tokenizer.chars == CHARS
    assert info == {"model_args": tiny_model(len(CHARS))[1], "config": {}, "iter_num": 0, "best_val_loss": 9.9,
                    "instruct": None, "val_loss": None, "holds_best": None, "best_iter": None}
    (Path(folder) / "config.json").write_text("{}")  # an export written into the run's folder too
    (Path(folder) / "model.safetensors").write_bytes(b"")
    assert loading.load(folder, "cpu")[2] == info  # the run's checkpoint is what loads


def test_weights_or_a_tokenizer_that_do_not_fit_the_model_are_refused_in_one_line(tmp_path):
    import loading
    desc = {"name": "char", "vocab_size": len(CHARS), "eot_id": None, "chars": CHARS}
    folder = Path(save_ckpt(tmp_path, desc, len(CHARS)))
    ckpt = checkpoint.load(folder)
    checkpoint.save({**ckpt, "model_args": {**ckpt["model_args"], "n_embd": 32}}, folder / "ckpt.pt")
    with pytest.raises(UserError, match=r"ckpt.pt: the weights do not match its model_args \(.*\); the file is "
                                        r"damaged or was edited$"):
        loading.load_model(str(folder), "cpu")
    bigger = {**desc, "chars": CHARS + ["~"], "vocab_size": len(CHARS) + 1}
    checkpoint.save({**ckpt, "tokenizer": bigger}, folder / "ckpt.pt")
    with pytest.raises(UserError, match=rf"the tokenizer has {len(CHARS) + 1} tokens but the model only "
                                        rf"{len(CHARS)}; the checkpoint is inconsistent"):
        loading.load_model(str(folder), "cpu")


def test_a_file_given_for_a_models_folder_names_the_folder_to_pass(tmp_path):
    import loading
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError) as e:
        loading.check_folder(str(tmp_path / "ckpt.pt"), "--init_from")
    assert str(e.value) == (f"--init_from={tmp_path / 'ckpt.pt'} is a file: pass the folder that holds it (a run's "
                            f"ckpt.pt, or a Hugging Face model), --init_from={tmp_path}")


def test_what_counts_as_a_hugging_face_or_model_folder(tmp_path):
    import loading
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(b"weights")  # no config.json yet
    assert not loading.is_hf_folder(hf) and not loading.is_model_folder(hf)
    (hf / "config.json").write_text("{}")
    assert loading.is_hf_folder(hf) and loading.is_model_folder(hf)  # the older weights file counts too
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    assert loading.is_model_folder(run) and not loading.is_hf_folder(run)
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    loading.check_not_an_export(run)  # a run's folder that also holds an export: its ckpt.pt is what counts


# ---------------------------------------------------------------------------- sample.py

def test_same_seed_same_samples_and_batch(char_dir, capsys):
    argv = [f"--out_dir={char_dir}", "--prompt=ROMEO:", "--max_new_tokens=30", "--num_samples=3"]
    a = run(argv, capsys)
    assert run(argv, capsys) == a
    assert run(argv + ["--seed=7"], capsys) != a
    samples = a.split("\n---------------\n")
    assert len(samples) == 4 and samples[-1] == ""  # three samples, each followed by dashes
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 30 for s in samples[:3])


def test_greedy_and_top_k_flags(char_dir, capsys):
    base = [f"--out_dir={char_dir}", "--prompt=ab", "--max_new_tokens=40"]
    greedy = run(base + ["--temperature=0"], capsys)
    assert run(base + ["--temperature=0", "--use_cache=false"], capsys) == greedy
    assert run(base + ["--top_k=100000"], capsys) == run(base + ["--top_k=0"], capsys)
    assert run(base + ["--top_k=none", "--top_p=0.5"], capsys).startswith("ab")


def test_long_prompt_and_output_slide(char_dir, capsys):
    prompt = "a b c d e " * 5  # 50 characters, block_size 8
    out = run([f"--out_dir={char_dir}", f"--prompt={prompt}", "--max_new_tokens=30"], capsys)
    assert out.startswith(prompt) and len(out) == len(prompt) + 30 + 1


def test_prompt_from_file(char_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("MEAR: so\n", encoding="utf-8")
    out = run([f"--out_dir={char_dir}", f"--prompt=FILE:{tmp_path / 'p.txt'}", "--max_new_tokens=5"], capsys)
    assert out.startswith("MEAR: so\n")
    with pytest.raises(UserError, match="not found"):
        sample.main([f"--out_dir={char_dir}", f"--prompt=FILE:{tmp_path / 'nope.txt'}"])


def test_unknown_prompt_characters(char_dir, capsys):
    with pytest.raises(UserError, match=r"'é'.*'€'.*--drop_unknown"):
        sample.main([f"--out_dir={char_dir}", "--prompt=ROMEO: é€", "--max_new_tokens=5"])
    out = run([f"--out_dir={char_dir}", "--prompt=ROMEO: é€", "--max_new_tokens=5", "--drop_unknown"], capsys)
    assert out.startswith("ROMEO: ") and len(out) == len("ROMEO: ") + 5 + 1
    with pytest.raises(UserError, match="no character the model knows"):
        sample.main([f"--out_dir={char_dir}", "--prompt=€", "--drop_unknown"])
    assert "precision" not in capsys.readouterr().err  # a mistake gets one line, nothing before it


def test_missing_or_foreign_checkpoint(tmp_path, capsys):
    with pytest.raises(UserError, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path / 'missing'}"])
    torch.save({"a": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        sample.main([f"--out_dir={tmp_path}"])
    (tmp_path / "ckpt.pt").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as exit_info:  # run_main turns it into one line and exit code 2
        run_main(sample.main, [f"--out_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_nonsense_values_one_error_line_no_traceback(char_dir):
    bad = ["--num_samples=0", "--max_new_tokens=-1", "--temperature=nan", "--top_k=-3", "--top_p=0",
           "--top_p=1.5"]
    result = run_cli([f"--out_dir={char_dir}", *bad])
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for flag in ("--num_samples", "--max_new_tokens", "--temperature", "--top_k", "--top_p"):
        assert flag in lines[0]
    assert "Traceback" not in result.stderr


def test_interactive_answers_each_line_until_quit_or_end_of_input(char_dir):
    base = [f"--out_dir={char_dir}", "--interactive", "--max_new_tokens=10", "--temperature=0"]
    result = run_cli(base, input="ROMEO:\nab\nquit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">> ") == 3  # two answers, then quit at the third prompt
    answers = result.stdout.split(">> ")[1:3]
    assert all(len(a) == 10 + 1 for a in answers)  # ten characters and a newline each

    result = run_cli(base, input="ab\ncd é\n")  # end of input; a bad line is reported, not fatal
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">> ") == 3 and "Traceback" not in result.stderr
    assert "'é'" in result.stderr


def test_a_finished_run_ends_at_once_except_under_a_profiler(char_dir):
    # sample.py skips Python's teardown once its output is flushed; all of it still arrives,
    # and a profiler (which prints at exit) still gets to print
    args = [f"--out_dir={char_dir}", "--prompt=ab", "--max_new_tokens=40", "--temperature=0", "--num_samples=2"]
    result = run_cli(args)
    assert result.returncode == 0 and result.stdout.count("ab") == 2 and result.stdout.endswith("\n")
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-s", "tottime", "sample.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert profiled.returncode == 0 and "function calls" in profiled.stdout
    assert profiled.stdout.startswith(result.stdout)  # the same text, then the profile


def test_bpe_stream_never_breaks_characters(gpt2, bpe_dir, capsys):
    text = "héllo wörld — 日本語のテキスト 🙂🚀 naïve café"
    ids = gpt2.encode(text)
    # the test means something only if some tokens end inside a character
    assert any(_invalid_utf8(gpt2.decode_bytes([i])) for i in ids)
    chunks = []
    stream = StopCondition(gpt2, 1)  # what sample.py and app.py stream through
    for i in ids:
        stream.update([i])
        chunks.append(stream.new_text(0))
    stream.finish()
    chunks.append(stream.new_text(0))
    assert "".join(chunks) == text and "\ufffd" not in "".join(chunks)

    printed = run([f"--out_dir={bpe_dir}", f"--prompt={text}", "--max_new_tokens=5"], capsys)
    assert printed.startswith(text)
    assert run([f"--out_dir={bpe_dir}", "--prompt=", "--max_new_tokens=3"], capsys)  # starts at <|endoftext|>


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_a_crlf_cr_or_bom_prompt_file_reads_as_its_lf_copy(char_dir, tmp_path, capsys):
    """FILE: prompts are read as prepare.py reads text: CRLF and CR line ends as "\\n", no
    leading byte-order mark (which a char-level model would refuse as unknown)."""
    lf = "MEAR: so\nRO:\n"
    outputs = []
    for name, data in {"lf": lf, "crlf": "\ufeff" + lf.replace("\n", "\r\n"), "cr": lf.replace("\n", "\r")}.items():
        (tmp_path / name).write_bytes(data.encode("utf-8"))
        outputs.append(run([f"--out_dir={char_dir}", f"--prompt=FILE:{tmp_path / name}", "--max_new_tokens=8",
                            "--temperature=0"], capsys))
    assert outputs[0].startswith(lf) and outputs == [outputs[0]] * 3


def test_interactive_prompt_is_the_first_input(char_dir, tmp_path):
    """--interactive --prompt=TEXT (or FILE:path) starts the session with TEXT, shown as if typed."""
    base = [f"--out_dir={char_dir}", "--interactive", "--max_new_tokens=10", "--temperature=0"]
    typed = run_cli(base, input="ab\ncd\n")
    prompted = run_cli([*base, "--prompt=ab"], input="cd\n")
    assert typed.returncode == prompted.returncode == 0, prompted.stderr
    assert prompted.stdout == typed.stdout.replace(">> ", ">> ab\n", 1)  # the same answers
    (tmp_path / "p.txt").write_text("ab\r\n", encoding="utf-8", newline="")
    from_file = run_cli([*base, f"--prompt=FILE:{tmp_path / 'p.txt'}"], input="cd\n")
    assert from_file.stdout.startswith(">> ab\n\n")  # the file's text, its line end read as "\n"


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    """CTRL's penalty, as Hugging Face's: a seen token's positive logit is divided by it and its
    negative logit multiplied, so a seen token always becomes less likely."""
    logits = torch.tensor([[3.0, -1.0, 2.0, -3.0]])
    assert sample_next(logits, 0, repetition_penalty=4.0, seen=torch.tensor([[0, 1]])).item() == 2  # 3 -> 0.75
    logits = torch.tensor([[-1.0, -2.0]])
    assert sample_next(logits, 0, repetition_penalty=4.0, seen=torch.tensor([[0]])).item() == 1  # -1 -> -4
    assert sample_next(logits, 0, repetition_penalty=1.0, seen=torch.tensor([[0]])).item() == 0  # off


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    """Probabilities 0.5, 0.25, 0.25 and top_p=0.5: the first token alone reaches p, so it is the
    only one ever drawn; at 0.51 the second one joins it (never the third with the first two)."""
    logits = torch.tensor([[2.0, 1.0, 1.0]]).log()
    probs = logits.softmax(-1)[0]
    assert probs[0].item() == 0.5 and probs[1].item() == 0.25  # exact in float32: the boundary is exact
    drawn = {sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert drawn == {0}
    drawn = {sample_next(logits, 1.0, top_p=0.51, generator=torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert 0 in drawn and len(drawn) == 2


def test_stop_notes_are_for_char_models_only_and_a_prompt_note_for_one_over_the_context():
    bpe = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)])
    assert sample.stops_never_written(bpe, ["\u00a7", "END"]) == []  # a byte-level vocabulary writes any text
    assert sample.too_long(32, 32, True) is None  # a prompt that fills the context exactly is read whole
    plain, chat = sample.too_long(33, 32, False), sample.too_long(33, 32, True)
    assert plain == "note: the prompt is 33 tokens, more than the model's context of 32: it reads only the last 32"
    assert chat.startswith(plain + ", without the start of the template")


def test_the_empty_prompts_example_is_a_letter_the_model_knows_or_a_file():
    with pytest.raises(UserError, match=r"^the prompt is empty; give some text, e.g. --prompt=a$"):
        encode_prompt(Tokenizer.char_from_text("\n .a"), "", False)  # not the line end, sorted first
    with pytest.raises(UserError, match=r"^the prompt is empty; give some text it knows, or --prompt=FILE:PATH$"):
        encode_prompt(Tokenizer.char_from_text("\n .-"), "", False)  # no letter or digit to show


def test_an_example_prompt_is_one_the_model_can_take():
    """The page's placeholder and the card's prompt: ROMEO: or a question where the model knows
    their characters, else a character of its own (a letter, a digit, then anything but a
    space), the same one sample.py's empty-prompt hint names."""
    from generation import example_prompt
    instruct = {"template": template.TEMPLATE}
    bpe = Tokenizer.bpe_from_ranks([bytes([i]) for i in range(256)])
    assert example_prompt(bpe) == "ROMEO:" and example_prompt(bpe, instruct) == "What is 2+2?"
    assert example_prompt(Tokenizer.char_from_text("ROMEO: abc")) == "ROMEO:"
    assert example_prompt(Tokenizer.char_from_text("add 12 and 3\n"), instruct) == "a"  # no '?', no 'W'
    assert example_prompt(Tokenizer.char_from_text("2+2? 4"), instruct) == "2+2?"
    digits = Tokenizer.char_from_text("0123 ,.\n")
    assert example_prompt(digits) == "0"
    with pytest.raises(UserError, match=r"e.g. --prompt=0$"):
        encode_prompt(digits, "", False)
