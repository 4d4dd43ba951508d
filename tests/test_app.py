"""app.py, the web demo: a real server in a subprocess, driven by gradio_client and by a real
browser (Debian's chromium, headless, through playwright). Two tiny checkpoints are trained here."""
import contextlib
import shutil
import threading
import time
from pathlib import Path

import pytest

import app
import hardware
import sample
import train
from conftest import TINY, serve, write_char_dataset
from errors import UserError

pytest.importorskip("gradio_client", reason="pip install -r requirements-extras.txt")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

PROMPT = "ROMEO:"
LIMIT = 20_000  # high: the Stop test needs a generation that lasts longer than the browser lags behind


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text):
    """runs/a and runs/b: two tiny char-level models (b with another seed and one layer)."""
    root = tmp_path_factory.mktemp("runs")
    write_char_dataset(root / "data", shakespeare_text[:30_000])
    for name, extra in (("a", []), ("b", ["--n_layer=1", "--seed=7"])):
        train.main([f"--data_dir={root / 'data'}", f"--out_dir={root / 'runs' / name}", *TINY,
                    "--max_iters=4", "--eval_interval=4", *extra])
    return root / "runs"


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """app.py serving runs/a (the default) and everything under runs/, on a free port."""
    log = tmp_path_factory.mktemp("server") / "app.log"
    yield from serve([f"--out_dir={runs / 'a'}", f"--models_dir={runs}", f"--max_new_tokens_limit={LIMIT}"], log)


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def sample_py(out_dir, capsys, **settings) -> str:
    """What `python sample.py` prints for these settings."""
    flags = [f"--{k}={v}" for k, v in {"prompt": PROMPT, "max_new_tokens": 60, **settings}.items()]
    sample.main([f"--out_dir={out_dir}", "--device=cpu", *flags])
    return capsys.readouterr().out


def generate(client, **settings) -> str:
    values = {"prompt": PROMPT, "max_new_tokens": 60, "temperature": 0.8, "top_k": 200, "top_p": 1.0,
              "seed": 1337, **settings}
    return client.predict(**values, api_name="/generate")


# ---------------------------------------------------------------------------- gradio_client

def test_same_text_as_sample_py(client, runs, capsys):
    for settings in ({"temperature": 0}, {"temperature": 0.9, "seed": 7}, {"temperature": 1.2, "top_k": 5, "top_p": 0.9}):
        text = generate(client, **settings)
        assert text.startswith(PROMPT) and len(text) == len(PROMPT) + 60  # one character per token
        assert sample_py(runs / "a", capsys, **settings) == text + "\n"  # the prompt included, as printed
    # the model picker: another checkpoint, its own text
    # (seeded sampling: the greedy texts of two tiny models can both be one repeated character)
    text_b = generate(client, temperature=0.9, seed=3, model="b")
    assert sample_py(runs / "b", capsys, temperature=0.9, seed=3) == text_b + "\n"
    assert text_b != generate(client, temperature=0.9, seed=3)


def test_streaming(client):
    job = client.submit(PROMPT, 300, 0.8, 200, 1.0, 3, api_name="/generate")
    updates = list(job)  # every value the server streamed, in order (at most one per --stream_interval)
    final = job.result()
    assert len(updates) >= 3, updates  # the prompt at once, then pieces, not one block at the end
    assert updates[0] == PROMPT and updates[-1] == final and len(final) == len(PROMPT) + 300
    assert all(b.startswith(a) and b != a for a, b in zip(updates, updates[1:]))  # the text only grows


def test_two_clients_at_once(client, server):
    """Two tabs at once: gradio's queue serves both, each with its own settings and seed."""
    other = Client(server, verbose=False)
    jobs = [c.submit(PROMPT, 60, 0.9, 200, 1.0, seed, api_name="/generate") for c, seed in ((client, 1), (other, 2))]
    texts = [job.result(timeout=120) for job in jobs]
    assert texts == [generate(client, temperature=0.9, seed=1), generate(client, temperature=0.9, seed=2)]


def test_each_setting_is_honoured(client):
    def short(**settings):
        return generate(client, **{"max_new_tokens": 30, **settings})
    greedy = short(temperature=0)
    assert len(short(max_new_tokens=7)) == len(PROMPT) + 7
    assert short(temperature=0, seed=99) == greedy  # greedy ignores the seed
    hot = [short(temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]  # the same seed gives the same text, another seed another
    assert hot[0] != greedy
    assert short(temperature=1.5, top_k=1, seed=5) == greedy  # top-1 is greedy
    assert short(temperature=1.5, top_k=0, top_p=1e-6, seed=5) == greedy  # so is a tiny nucleus
    assert short(temperature=1.5, top_k=0, seed=5) != short(temperature=1.5, top_k=3, seed=5)


def test_bad_requests_get_a_message_and_the_server_goes_on(client):
    cases = {
        "max_new_tokens above the limit": ({"max_new_tokens": LIMIT + 1}, f"above this server's limit of {LIMIT}"),
        "unknown characters": ({"prompt": "ROMEO ☃"}, "not in the char vocabulary: '☃'; remove them"),
        "empty prompt": ({"prompt": ""}, "the prompt is empty"),
        "negative temperature": ({"temperature": -1}, "temperature must be a finite number >= 0"),
        "top_p 0 and negative top_k": ({"top_p": 0, "top_k": -3}, "top_k must be >= 0"),
        "fractional top_k": ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        "negative max_new_tokens": ({"max_new_tokens": -5}, "max_new_tokens must be >= 0"),
        "unknown model": ({"model": "nope"}, "nope"),
    }
    for name, (settings, message) in cases.items():
        with pytest.raises(AppError) as e:
            generate(client, **settings)
        assert message in str(e.value), name
    assert generate(client, temperature=0).startswith(PROMPT)  # still serving


def test_model_card_and_loss_curve(client, runs):
    card, curve = client.predict("b", api_name="/model_card")
    for fact in ("### b", "parameters", "1 layers", "dataset**: tiny", "char (", "4 iterations", "val loss"):
        assert fact in card, (fact, card)
    assert Path(curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_copy_of_each_model(runs):
    precision = hardware.resolve("cpu", "float32")
    models = app.Models({"a": runs / "a", "b": runs / "b"}, precision)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.get("b"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 4 and all(g is got[0] for g in got) and list(models.loaded) == ["b"]


def test_broken_checkpoints_are_skipped_or_a_message_when_picked(runs, tmp_path):
    """--models_dir with damaged checkpoints among good ones: one that is not even a readable zip
    (cut short) is left out at once; of those damaged inside, the first found that loads is the
    default (one line on stderr for each skipped on the way), and one found later fails only when
    picked, as a message; the server goes on. With none that loads: one error line."""
    models = tmp_path / "models"
    good = (runs / "b" / "ckpt.pt").read_bytes()
    inside = bytearray(good)
    inside[len(good) // 2] ^= 0xFF  # a byte of the weights changed: still a zip, its checksum fails
    for name, data in (("a", bytes(inside)), ("b", good), ("c", bytes(inside)), ("d", good[:1000])):
        (models / name).mkdir(parents=True)
        (models / name / "ckpt.pt").write_bytes(data)
    log = tmp_path / "app.log"
    with contextlib.contextmanager(serve)([f"--models_dir={models}"], log) as url:
        client = Client(url, verbose=False)
        assert generate(client, temperature=0).startswith(PROMPT)  # b, the default
        card, curve = client.predict("c", api_name="/model_card")  # the card says why, not b's card
        assert card.startswith("### c\n**could not be loaded**: ") and "c/ckpt.pt is" in card and curve is None
        with pytest.raises(AppError, match="c/ckpt.pt is (truncated or )?corrupted"):
            generate(client, model="c")
        assert generate(client, temperature=0, model="b").startswith(PROMPT)
        assert "Traceback" not in log.read_text()  # (gradio's own refusal below logs one)
        # app.py's own line: gradio's spoke of `share=True` in `launch()`, which a user never sees
        assert f"running on {url} (--share also makes a public link); Ctrl-C stops it" in log.read_text()
        assert "launch()" not in log.read_text()
        with pytest.raises(AppError, match=r"a is not in the list of choices: \['b', 'c'\]"):  # left out of the picker
            generate(client, model="a")
    skipped = [line for line in log.read_text().splitlines() if line.startswith("skipped model")]
    assert len(skipped) == 2 and skipped[0].startswith(f"skipped model {models / 'd'}: {models / 'd' / 'ckpt.pt'} "
                                                       f"is not a readable checkpoint")
    assert skipped[1].startswith(f"skipped model a: {models / 'a' / 'ckpt.pt'} is") and "corrupted" in skipped[1]

    shutil.rmtree(models / "b")
    folders = app.model_folders(app.AppConfig(models_dir=str(models)))
    with pytest.raises(UserError, match="no model found loads"):
        app.Models(folders, hardware.resolve("cpu", "float32")).load_default(only_this=False)


def test_a_hugging_face_folder_of_another_architecture_is_left_out(runs, tmp_path, capsys):
    """--models_dir with a Llama saved by transformers beside our runs: not in the picker, one line."""
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    shutil.copytree(runs / "a", tmp_path / "a")
    assert list(app.model_folders(app.AppConfig(models_dir=str(tmp_path)))) == ["a"]
    assert f"skipped model {tmp_path / 'llama'}: {tmp_path / 'llama'} holds a 'llama' model" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def page(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not found: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-extras.txt")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, timeout=60_000,
            viewport={"width": 1280, "height": 900},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server)
            yield page
        finally:
            browser.close()


def wait_until_still(read, seconds=1.0, timeout=60):
    """read() once it has stopped changing for `seconds`."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
    raise AssertionError(f"still changing after {timeout} s: {last!r}")


def started(value: str, previous: str) -> bool:
    """The new text is streaming in (the box may first be emptied: too early to stop it)."""
    return value.startswith(PROMPT) and len(value) > len(PROMPT) and value != previous


def test_browser_generate_and_stop(page, client, tmp_path):
    output = page.get_by_label("Output")
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_role("button", name="Generate").click()
    text = generate(client, max_new_tokens=100)  # the page's defaults: sample.py's, 100 tokens
    deadline = time.monotonic() + 60
    while output.input_value() != text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert output.input_value() == text
    assert "val loss" in page.get_by_text("val loss").first.inner_text()
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'app.png'}")

    # Stop: a long generation is cut short and stays so
    page.get_by_label(f"max new tokens (up to {LIMIT})").fill(str(LIMIT))
    page.get_by_label("seed").fill("2")
    page.get_by_role("button", name="Generate").click()
    deadline = time.monotonic() + 60
    while not started(output.input_value(), text):
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.02)
    page.get_by_role("button", name="Stop").click()
    stopped = wait_until_still(output.input_value, seconds=1.5)
    assert stopped.startswith(PROMPT) and len(stopped) < len(PROMPT) + LIMIT
    time.sleep(1)
    assert output.input_value() == stopped

    # a refused request shows its message on the page
    page.get_by_label(f"max new tokens (up to {LIMIT})").fill(str(LIMIT + 1))
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(f"above this server's limit of {LIMIT}").first.wait_for(state="visible")
    assert output.input_value() == ""  # not the stopped text, as if it answered this request
    time.sleep(1)  # the message slides in
    page.screenshot(path=str(tmp_path / "refused.png"))


def test_loss_curve_drawn_from_metrics_when_the_run_has_no_png(runs, tmp_path):
    folder = tmp_path / "copied"
    folder.mkdir()
    for name in ("ckpt.pt", "metrics.jsonl"):  # a run from before loss.png existed
        shutil.copy(runs / "b" / name, folder / name)
    loaded = app.Models({"copied": folder}, hardware.resolve("cpu", "float32")).get("copied")
    curve = app.loss_curve(loaded, tmp_path)
    assert Path(curve).parent == tmp_path and Path(curve).read_bytes()[:4] == b"\x89PNG"
    (folder / "metrics.jsonl").write_text("damaged\n{}\n")
    assert app.loss_curve(loaded, tmp_path / "x") is None  # no picture, but the model still serves
    assert "**val loss**" in app.model_card("copied", loaded)


# ---------------------------------------------------------------------------- the pure functions, without a server

def test_read_settings_takes_the_limit_itself_and_refuses_one_more():
    assert app.read_settings(7, 0.8, 200, 1.0, 1, limit=7).max_new_tokens == 7
    with pytest.raises(UserError, match="max_new_tokens is 8, above this server's limit of 7"):
        app.read_settings(8, 0.8, 200, 1.0, 1, limit=7)
    with pytest.raises(UserError, match="temperature is empty"):
        app.read_settings(7, "", 200, 1.0, 1, limit=7)


def test_prompt_ids_of_takes_the_longest_prompt_and_an_empty_one_where_a_document_can_start():
    from tokenizer import Tokenizer
    plain = Tokenizer.char_from_text("ab")
    assert len(app.prompt_ids_of(plain, "a" * app.MAX_PROMPT_CHARS)) == app.MAX_PROMPT_CHARS
    with pytest.raises(UserError, match="the limit is 100,000"):
        app.prompt_ids_of(plain, "a" * (app.MAX_PROMPT_CHARS + 1))
    with pytest.raises(UserError, match="the prompt is empty"):
        app.prompt_ids_of(plain, "")
    documents = Tokenizer.char_from_text("ab", documents="line")
    assert app.prompt_ids_of(documents, "") == [documents.eot_id]  # a new document
    assert app.prompt_ids_of(documents, "ba") == [documents.eot_id, 1, 0]


def test_model_card_shows_the_checkpoints_shape_and_no_infinite_loss(tmp_path):
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=24, vocab_size=3)
    model = GPT(GPTConfig(**args))

    def card(best, iters):
        info = {"model_args": args, "config": {"dataset": "tiny"}, "iter_num": iters, "best_val_loss": best}
        return app.model_card("m", app.Loaded(model, Tokenizer.char_from_text("abc"), tmp_path, info, model))

    text = card(1.23456, 1500)
    assert "1 layers, 2 heads, 16 wide, context 24 tokens" in text
    assert "**trained**: 1,500 iterations; **val loss**: 1.2346" in text and "3 characters" in text
    assert "**val loss**: not evaluated" in card(float("inf"), 0)  # a run that never evaluated
    assert "**trained**: unknown iterations" in card(None, None)
    # always_save_checkpoint keeps the last model: where it is not the run's best, its own loss is said
    worse = {"model_args": args, "config": {"dataset": "tiny"}, "iter_num": 20, "best_val_loss": 2.6396,
             "val_loss": 4.2066, "holds_best": False, "best_iter": 0}
    text = app.model_card("m", app.Loaded(model, Tokenizer.char_from_text("abc"), tmp_path, worse, model))
    assert "**val loss**: 4.2066 (this model's; the run's best was 2.6396, at iteration 0: the model this run started from)" in text
    del worse["val_loss"]  # saved at a stop, or by an older train.py: its own loss is not in the checkpoint
    text = app.model_card("m", app.Loaded(model, Tokenizer.char_from_text("abc"), tmp_path, worse, model))
    assert "**val loss**: this model's not recorded (the run's best was 2.6396, at iteration 0: the model this run started from)" in text


def test_find_model_folders_sorted_and_leaves_out_hidden_folders_datasets_and_environments(tmp_path):
    import torch
    for name in ("b", "a", "a/inner", ".hidden", "data/x", "venv", "__pycache__"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        torch.save({}, tmp_path / name / "ckpt.pt")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    assert app.find_model_folders(tmp_path) == [tmp_path / "a", tmp_path / "a" / "inner", tmp_path / "b"]
