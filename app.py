"""A web page to try a trained model (gradio): type a prompt, watch the text stream in.

    python app.py --out_dir=out-shakespeare-char            # http://127.0.0.1:7860
    python app.py --models_dir=.                            # a picker over every checkpoint under .
    python app.py                                           # the out*/ checkpoints beside app.py

The page has a Prompt, Generate and Stop buttons, the Output as it streams (updated at most
every --stream_interval: a small model writes tokens faster than a page redraws), the sampling
settings of sample.py (max new tokens, temperature, top-k, top-p, seed, min-p, repetition
penalty), a Chat box for models trained on chats (docs/finetune.md), and beside them a
model picker with each model's card and loss curve. Programs call the same generation as the
API endpoint `/generate` (parameters prompt, max_new_tokens, temperature, top_k, top_p, seed,
and optionally model, min_p, repetition_penalty; `/chat` takes a message and the history
before those), e.g. with gradio_client:

    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict("ROMEO:", 100, 0.8, 200, 1.0, 1337, api_name="/generate")

- Generation is sample.py's own (generation.generate_text): the same settings and seed give
  exactly the text `python sample.py` prints, prompt included (without its final newline).
- The server listens on 127.0.0.1 only; --host=0.0.0.0 opens it to the network and --share
  makes a public gradio.live link. On a Hugging Face Space, which sets GRADIO_SERVER_NAME and
  GRADIO_SERVER_PORT, those are used unless --host or --port are given.
- Each checkpoint is loaded once, on first use, and kept; a lock stops two tabs from loading
  the same one twice. gradio's queue runs one generation at a time per button (Generate, Chat)
  and the others wait their turn; max_new_tokens is bounded by --max_new_tokens_limit.
- Every mistake in a request (a bad value, an empty prompt, a character the model never saw)
  is a message on the page (or the API's error); the server keeps serving.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while torch imports: one line, no traceback
import gc
gc.disable()  # no garbage collection while torch imports: start-up and exit ~0.3 s faster (docs/speed.md)
import dataclasses
import math
import os
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint
import hardware
import hf_format
import plot
import template
from config import coerce, parse_config
from errors import UserError, run_main
from generation import GenerationConfig, choose_decoder, encode_prompt, example_prompt, generate_text, too_long
from loading import choose_precision, is_model_folder, load
gc.freeze()  # what the imports made is never traversed again, not even at exit
gc.enable()

HERE = Path(__file__).resolve().parent
MAX_PROMPT_CHARS = 100_000  # a longer prompt is refused: only its last block_size tokens are read anyway
SKIP_DIRS = {"data", "wandb", "node_modules", "site-packages"}  # never hold checkpoints; can be huge


@dataclass
class AppConfig:
    """Settings of app.py."""
    out_dir: str = ""  # folder holding ckpt.pt; empty = every out*/ folder with a ckpt.pt beside app.py
    models_dir: str = ""  # also list every checkpoint folder under this folder in the model picker
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: the network); unset: $GRADIO_SERVER_NAME if set
    port: int = 7860  # port to listen on; unset: $GRADIO_SERVER_PORT if set (a Hugging Face Space sets both)
    share: bool = False  # also make a public link through gradio.live (needs internet)
    max_new_tokens_limit: int = 1000  # requests for more new tokens are refused
    stream_interval: float = 0.05  # seconds between two updates of the page as the text streams in; 0 = every token
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (float32 on cpu: faster for decoding; bf16 or fp16 on gpus), float32, bfloat16 or float16
    cpu_threads: int = 0  # torch threads on cpu; 0 = all cores
    fast_weights: str = "auto"  # block matrices of the fast CPU path (dtype auto): auto (timed once, kept), float32 or int8
    compile: bool | None = None  # on a CPU the fast path's compiled decoding step: unset loads one kept in ~/.cache/nanogpt-toolkit (sample.py keeps it), true also builds a missing one as the model loads (a minute or more), false never; on a CUDA GPU unset replays the one-token step as a CUDA graph, false runs the model eagerly

    def problems(self) -> list[str]:
        p = []
        if not 1 <= self.port <= 65535:
            p.append(f"--port must be in 1..65535, got {self.port}")
        if not self.host:
            p.append("--host must name an address, e.g. 127.0.0.1")
        if self.max_new_tokens_limit < 1:
            p.append(f"--max_new_tokens_limit must be at least 1, got {self.max_new_tokens_limit}")
        if self.cpu_threads < 0:
            p.append(f"--cpu_threads must be >= 0 (0 = all cores), got {self.cpu_threads}")
        if not (math.isfinite(self.stream_interval) and 0 <= self.stream_interval <= 10):
            p.append(f"--stream_interval must be between 0 and 10 seconds, got {self.stream_interval}")
        if self.fast_weights not in ("auto", "float32", "int8"):
            p.append(f"--fast_weights must be auto, float32 or int8, got {self.fast_weights!r}")
        return p


# ---------------------------------------------------------------------------- finding models

def find_model_folders(root: Path) -> list[Path]:
    """Every model folder under root (root included), sorted; hidden folders, virtual
    environments and datasets are skipped, and so is a Hugging Face folder of a model this
    project does not compute (a Llama, say), with a line on stderr."""
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in SKIP_DIRS
                         and not (Path(folder) / d / "pyvenv.cfg").exists())
        if is_model_folder(Path(folder)):
            if (Path(folder) / "ckpt.pt").is_file() and not zipfile.is_zipfile(Path(folder) / "ckpt.pt"):
                print(f"skipped model {folder}: {Path(folder) / 'ckpt.pt'} is not a readable checkpoint "
                      f"(truncated or not one)", file=sys.stderr, flush=True)  # (its end alone is read)
                continue
            if not (Path(folder) / "ckpt.pt").is_file():
                try:
                    hf_format.gpt_config(Path(folder))  # its config.json only: cheap
                except UserError as e:
                    print(f"skipped model {folder}: {e}", file=sys.stderr, flush=True)
                    continue
            found.append(Path(folder))
    return found


def model_folders(cfg: AppConfig) -> dict[str, Path]:
    """Display name -> folder of every model to serve, the default (--out_dir) first."""
    folders: list[Path] = []
    if cfg.out_dir:
        if not is_model_folder(Path(cfg.out_dir)):  # load it: its error says what is missing
            load(cfg.out_dir, "cpu")
        folders.append(Path(cfg.out_dir))
    if cfg.models_dir:
        root = Path(cfg.models_dir)
        if not root.is_dir():
            raise UserError(f"--models_dir={cfg.models_dir} is not a folder")
        found = find_model_folders(root)
        if not found and not folders:
            raise UserError(f"no checkpoint under --models_dir={cfg.models_dir} (no folder there holds "
                            f"ckpt.pt); train one with train.py or point at the folder that holds your runs")
        folders += found
    if not folders:  # neither flag: the runs beside app.py (a Hugging Face Space's layout)
        folders = [d for d in sorted(HERE.glob("out*")) if d.is_dir() and is_model_folder(d)]
        if not folders:
            raise UserError(f"no checkpoint found: no out*/ckpt.pt beside {HERE / 'app.py'}; pass "
                            f"--out_dir=FOLDER (the one holding ckpt.pt) or --models_dir=DIR")
    names: dict[str, Path] = {}
    seen = set()
    for folder in folders:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        try:  # a short name: the path below --models_dir, or the folder as given
            name = folder.resolve().relative_to(Path(cfg.models_dir).resolve()).as_posix() if cfg.models_dir else ""
        except ValueError:
            name = ""
        name = name if name not in ("", ".") else (folder.name or str(folder))
        names[name if name not in names else str(folder)] = folder
    return names


# ---------------------------------------------------------------------------- models

@dataclass
class Loaded:
    """A model ready to generate, and what its card shows."""
    model: torch.nn.Module
    tokenizer: object  # tokenizer.Tokenizer
    folder: Path
    info: dict  # from the checkpoint: model_args, config, iter_num, best_val_loss
    decoder: object  # what generates: generation.choose_decoder's (the fast CPU path, or the model)


class Models:
    """The models to serve by name, each loaded once, on first use, then kept in memory."""

    def __init__(self, folders: dict[str, Path], precision: hardware.Precision, dtype: str = "float32",
                 compile: bool | None = None, fast_weights: str = "auto"):
        self.folders = folders
        self.precision = precision
        # what choose_decoder reads; max_new_tokens=1: with compile unset, a kept compiled step
        # is loaded but none is built while a visitor waits for the first answer
        self.settings = GenerationConfig(dtype=dtype, compile=compile, max_new_tokens=1, fast_weights=fast_weights)
        self.loaded: dict[str, Loaded] = {}
        self.lock = threading.Lock()  # two tabs asking for a new model load it once
        self.default = next(iter(folders))

    def get(self, name: str | None) -> Loaded:
        name = name or self.default
        if name not in self.folders:
            raise UserError(f"unknown model {name!r}; choose one of: {', '.join(self.folders)}")
        with self.lock:
            if name not in self.loaded:
                model, tokenizer, info = load(str(self.folders[name]), self.precision.device)
                decoder, how = choose_decoder(model, self.settings, self.precision)  # as sample.py decodes
                print(f"{name}: decoding with {how}", flush=True)
                self.loaded[name] = Loaded(model, tokenizer, self.folders[name], info, decoder)
                # the checkpoint (weights again, optimizer state) is dropped: one copy of each model
            return self.loaded[name]

    def load_default(self, only_this: bool):
        """Load the default model now: a broken one fails at start, not on the first request.
        Unless it was named (only_this: --out_dir), a model found that does not load is left
        out, with a line on stderr, and the next one found becomes the default; none loading is
        the error. (The others load when picked: a broken one is then a message on the page.)"""
        for name in list(self.folders):
            try:
                self.get(name)
            except UserError as e:
                if only_this:
                    raise
                print(f"skipped model {name}: {e}", file=sys.stderr, flush=True)
                del self.folders[name]
                continue
            self.default = name
            return
        raise UserError("no model found loads (each is skipped above, with why); fix or replace their "
                        "checkpoints, or pass --out_dir or --models_dir to point at others")


def model_card(name: str, loaded: Loaded) -> str:
    """Markdown: parameters, shape, dataset and tokenizer, iterations, best val loss."""
    args, cfg, tok = loaded.info["model_args"] or {}, loaded.info["config"] or {}, loaded.tokenizer
    total = sum(p.numel() for p in loaded.model.parameters())
    iters = loaded.info.get("iter_num")
    best_text = checkpoint.val_loss_text({k: v for k, v in loaded.info.items() if v is not None}) or (
        "not evaluated" if isinstance(iters, int) else "not recorded")  # (a folder not exported by us)
    iters_text = f"{iters:,}" if isinstance(iters, int) else "unknown"
    vocab = f"{tok.vocab_size:,} characters" if tok.name == "char" else f"{tok.vocab_size:,} tokens"
    lines = [
        f"### {name}",
        f"- **parameters**: {loaded.model.num_params() / 1e6:.2f}M (nanoGPT's count, without lookup-only "
        f"tables such as positions), {total / 1e6:.2f}M in all",
        f"- **shape**: {args.get('n_layer')} layers, {args.get('n_head')} heads, {args.get('n_embd')} wide, "
        f"context {args.get('block_size')} tokens",
        f"- **dataset**: {cfg.get('dataset', 'unknown')}; **tokenizer**: {tok.name} ({vocab})",
        f"- **trained**: {iters_text} iterations; **val loss**: {best_text}",
        f"- **folder**: `{loaded.folder}`",
    ]
    return "\n".join(lines)


def loss_curve(loaded: Loaded, scratch: Path) -> str | None:
    """The run's loss.png, or one drawn from its metrics.jsonl into scratch; None without either."""
    png = loaded.folder / "loss.png"
    if png.is_file():
        return str(png)
    if not (loaded.folder / "metrics.jsonl").is_file():
        return None
    out = scratch / f"loss-{abs(hash(str(loaded.folder.resolve())))}.png"
    try:
        plot.save_png(plot.draw([plot.read_run(loaded.folder)]), out)
    except UserError:  # a damaged metrics.jsonl costs the picture, not the model
        return None
    return str(out)


def card_and_curve(name: str, loaded: Loaded, scratch: Path) -> tuple[str, str | None]:
    """The card, and the loss curve (where the folder has none, an export's, the card says why)."""
    card, path = model_card(name, loaded), loss_curve(loaded, scratch)
    if path is None:
        card += ("\n- **loss curve**: none here (no metrics.jsonl in this folder: an export keeps none; "
                 "the run's own folder has it)")
    return card, path


# ---------------------------------------------------------------------------- one request

def read_settings(max_new_tokens, temperature, top_k, top_p, seed, limit: int, min_p=0.0,
                  repetition_penalty=1.0) -> GenerationConfig:
    """A generation's settings from a request's values, checked as sample.py checks its flags."""
    types = {f.name: f.type for f in dataclasses.fields(GenerationConfig)}
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 min_p=min_p, repetition_penalty=repetition_penalty)
    values, errors = {}, []
    for key, value in given.items():
        if value is None or value == "":
            errors.append(f"{key} is empty; give a number")
            continue
        try:
            values[key] = coerce(key, value, types[key])
        except ValueError as e:
            errors.append(str(e).removeprefix("--"))
    if not errors:
        cfg = GenerationConfig(**values, num_samples=1)
        errors += [p.removeprefix("--") for p in cfg.problems()]
        if cfg.max_new_tokens > limit:
            errors.append(f"max_new_tokens is {cfg.max_new_tokens}, above this server's limit of {limit}; "
                          f"ask for fewer (the limit is app.py's --max_new_tokens_limit)")
    if errors:
        raise UserError("; ".join(errors))
    return cfg


def prompt_ids_of(tokenizer, prompt: str, instruct: dict | None = None) -> list[int]:
    """The prompt's token ids (wrapped in an instruction model's template), or a message a
    person at the page can act on."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"the prompt has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    if not prompt and tokenizer.eot_id is None:
        # a model with a boundary token (documents mode, BPE) starts a new document from an
        # empty prompt (generation.encode_prompt); a plain char model has nothing to start from
        raise UserError(f"the prompt is empty; type some text for the model to continue, e.g. "
                        f"\"{example_prompt(tokenizer, instruct)}\"")
    try:
        return encode_prompt(tokenizer, prompt, drop_unknown=False, instruct=instruct)
    except UserError as e:
        raise UserError(str(e).replace("pass --drop_unknown to drop them", "remove them from the prompt")) from None


def generate(models: Models, limit: int, interval: float, prompt, max_new_tokens, temperature, top_k, top_p,
             seed, model=None, min_p=0.0, repetition_penalty=1.0, warn=None):
    """Yield the text (prompt included; an instruction model's answer alone) as it grows:
    sample.py's generation, the prompt at once,
    then at most one update every `interval` seconds, then the whole text. A small model makes
    many tokens a second: one update per token would swamp the browser (and its Stop).
    An instruction model's prompt is wrapped in its template, and the answer ends at its end.
    warn(text): where a note for the visitor goes (a prompt longer than the model's context)."""
    cfg = read_settings(max_new_tokens, temperature, top_k, top_p, seed, limit, min_p, repetition_penalty)
    loaded = models.get(model)
    instruct = loaded.info.get("instruct")
    if instruct:
        cfg.stop = template.stop_strings(instruct["template"])
    prompt_ids = prompt_ids_of(loaded.tokenizer, "" if prompt is None else str(prompt), instruct)
    if warn and (note := too_long(len(prompt_ids), loaded.model.config.block_size, instruct is not None)):
        warn(note.removeprefix("note: "))
    generator = torch.Generator(device=models.precision.device).manual_seed(cfg.seed)  # as sample.py seeds
    shown, last = None, -math.inf
    for text in generate_text(loaded.decoder, loaded.tokenizer, prompt_ids, cfg, models.precision,
                              generator, echo_prompt=not instruct):  # an instruction model: the answer alone
        if time.monotonic() - last >= interval:
            yield text
            shown, last = text, time.monotonic()
    if text != shown:
        yield text


def message_text(content) -> str:
    """The text of a chat message as gradio hands it back: a string, or a list of parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def chat(models: Models, limit: int, interval: float, message, history, max_new_tokens, temperature, top_k,
         top_p, seed, model=None, min_p=0.0, repetition_penalty=1.0, warn=None):
    """Yield the chat (gradio's messages, [{"role", "content"}, ...]) with the model's answer as it
    grows, for a model trained on chats (JSONL "messages"). The history and the new message are
    wrapped as the training chats were, the oldest exchanges left out when they no longer fit
    in the block (template.chat_ids), as sample.py --interactive does."""
    cfg = read_settings(max_new_tokens, temperature, top_k, top_p, seed, limit, min_p, repetition_penalty)
    loaded = models.get(model)
    instruct = loaded.info.get("instruct")
    if not (instruct and instruct.get("chat")):
        raise UserError("this model was not trained on chats (JSONL records with \"messages\"); use Generate")
    message = "" if message is None else str(message)
    if not message.strip() or len(message) > MAX_PROMPT_CHARS:
        raise UserError(f"the message is empty or longer than {MAX_PROMPT_CHARS:,} characters")
    history = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []
               if m.get("role") in ("user", "assistant")]
    turns = [(m["role"], m["content"]) for m in history] + [("user", message)]
    block_size = loaded.model.config.block_size
    try:
        ids, _ = template.chat_ids(loaded.tokenizer, instruct["template"], turns,
                                   block_size - min(cfg.max_new_tokens, block_size // 2))
    except UserError as e:
        raise UserError(str(e).replace("pass --drop_unknown to drop them", "remove them from the message")) from None
    if warn and (note := too_long(len(ids), block_size, instruct=True)):
        warn(note.removeprefix("note: "))
    cfg.stop = template.stop_strings(instruct["template"])
    history.append({"role": "user", "content": message})
    generator = torch.Generator(device=models.precision.device).manual_seed(cfg.seed)
    shown, last = None, -math.inf
    for text in generate_text(loaded.decoder, loaded.tokenizer, ids, cfg, models.precision, generator,
                              echo_prompt=False):
        if time.monotonic() - last >= interval:
            yield history + [{"role": "assistant", "content": text}]
            shown, last = text, time.monotonic()
    if text != shown:
        yield history + [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------- the page

def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio
    except ImportError:
        raise UserError("app.py needs gradio: pip install -r requirements-extras.txt") from None
    return gradio


def build_demo(gr, models: Models, limit: int, interval: float, scratch: Path):
    """The gradio Blocks: prompt, buttons and output on the left, model picker and card on the right."""
    defaults = GenerationConfig()

    def on_generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, model, min_p, repetition_penalty):
        try:
            yield from generate(models, limit, interval, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                model, min_p, repetition_penalty, warn=gr.Warning)
        except UserError as e:  # shown on the page (and to API clients); the server goes on
            raise gr.Error(str(e), print_exception=False) from None

    def on_chat(message, history, max_new_tokens, temperature, top_k, top_p, seed, model, min_p,
                repetition_penalty):
        try:
            yield from chat(models, limit, interval, message, history, max_new_tokens, temperature, top_k, top_p,
                            seed, model, min_p, repetition_penalty, warn=gr.Warning)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def on_model(model):
        try:
            loaded = models.get(model)
        except UserError as e:  # the card says so (not the model picked before), and a toast
            gr.Warning(str(e))
            return f"### {model}\n**could not be loaded**: {e}", None
        return card_and_curve(model, loaded, scratch)

    def on_placeholder(model):  # an example prompt the model picked can take
        loaded = models.loaded.get(model)
        return gr.update(placeholder=example_prompt(loaded.tokenizer, loaded.info.get("instruct")) if loaded else "")

    first = models.get(models.default)
    with gr.Blocks(title="nanoGPT demo") as demo:
        gr.Markdown("## Try the model\nType the beginning of a text; the model continues it.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3,
                                    placeholder=example_prompt(first.tokenizer, first.info.get("instruct")))
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                output = gr.Textbox(label="Output", lines=12, max_lines=30, interactive=False)
                with gr.Row():
                    max_new_tokens = gr.Number(100, label=f"max new tokens (up to {limit})", min_width=120)
                    temperature = gr.Number(defaults.temperature, label="temperature (0 = greedy)", step=0.1,
                                            min_width=120)
                    top_k = gr.Number(defaults.top_k, label="top-k (0 = off)", min_width=120)
                    top_p = gr.Number(defaults.top_p, label="top-p (1 = off)", step=0.05, min_width=120)
                    seed = gr.Number(defaults.seed, label="seed", min_width=120)
                    min_p = gr.Number(defaults.min_p, label="min-p (0 = off)", step=0.05, min_width=120)
                    repetition_penalty = gr.Number(defaults.repetition_penalty, label="repetition penalty (1 = off)",
                                                   step=0.05, min_width=120)
                is_chat = bool((first.info.get("instruct") or {}).get("chat"))
                with gr.Accordion("Chat (a model trained on chats: JSONL messages)", open=is_chat):
                    chatbot = gr.Chatbot(label="Chat", height=300)
                    with gr.Row():
                        message = gr.Textbox(label="Message", scale=4)
                        send = gr.Button("Send", variant="primary", scale=1)
                        clear = gr.Button("Clear", scale=1)
            with gr.Column(scale=2):
                model = gr.Dropdown(list(models.folders), value=models.default, label="Model",
                                    interactive=len(models.folders) > 1)
                first_card, first_curve = card_and_curve(models.default, first, scratch)
                card = gr.Markdown(first_card, label="model card")
                curve = gr.Image(first_curve, label="loss curve", show_label=False, type="filepath",
                                 interactive=False, format="png")
        settings = [max_new_tokens, temperature, top_k, top_p, seed, model, min_p, repetition_penalty]
        # the page empties the Output first: a refused request must not leave the last text
        # under its message as if it were the answer (the API's /generate is on_generate alone)
        event = go.click(lambda: "", None, output, queue=False, api_name=False).then(
            on_generate, [prompt, *settings], output, api_name="generate")
        chat_event = send.click(on_chat, [message, chatbot, *settings], chatbot, api_name="chat")
        chat_event.success(lambda: "", None, message, api_name=False)  # the message went into the chat
        clear.click(lambda: [], None, chatbot, api_name=False)
        stop.click(None, None, None, cancels=[event, chat_event])
        model.change(on_model, model, [card, curve], api_name="model_card").then(
            on_placeholder, model, prompt, api_name=False)
    return demo


def main(argv=None):
    cfg, explicit = parse_config(AppConfig, argv, prog="app.py")
    folders = model_folders(cfg)  # no checkpoint: one error line, before any server
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    else:
        hardware.set_cpu_threads()
    precision = choose_precision(cfg.device, cfg.dtype)
    models = Models(folders, precision, cfg.dtype, cfg.compile, cfg.fast_weights)
    models.load_default(only_this=bool(cfg.out_dir))
    # a Hugging Face Space says where to listen in GRADIO_SERVER_NAME / _PORT; explicit flags win
    host = cfg.host if "host" in explicit else os.environ.get("GRADIO_SERVER_NAME", cfg.host)
    env_port = os.environ.get("GRADIO_SERVER_PORT")
    if env_port is not None and not env_port.isdigit():  # gradio itself would fail to import
        raise UserError(f"GRADIO_SERVER_PORT={env_port!r} is not a port number; fix or unset it")
    port = cfg.port if "port" in explicit or not env_port else int(env_port)
    gr = import_gradio()
    print(f"precision: {precision.reason}")
    print(f"models: {', '.join(f'{name} ({folder})' for name, folder in folders.items())}")
    with tempfile.TemporaryDirectory(prefix="nanogpt-app-") as scratch:
        demo = build_demo(gr, models, cfg.max_new_tokens_limit, cfg.stream_interval, Path(scratch))
        demo.queue(max_size=64)  # one generation at a time (gradio's default); 64 more may wait
        try:  # quiet: gradio's own lines speak of launch()'s arguments, which a user of app.py never sees
            _, local_url, share_url = demo.launch(
                server_name=host, server_port=port, share=cfg.share, show_error=True, quiet=True,
                prevent_thread_lock=True, allowed_paths=[str(f.resolve()) for f in folders.values()])
        except OSError as e:
            reason = str(e).split(". ")[0]  # gradio's first sentence; the rest speaks of launch()
            raise UserError(f"cannot listen on {host}:{port} ({reason}); pass another --port or --host") from None
        public = f", and at {share_url}" if share_url else "" if cfg.share else " (--share also makes a public link)"
        print(f"running on {local_url}{public}; Ctrl-C stops it", flush=True)
        demo.block_thread()


if __name__ == "__main__":
    run_main(main)
    # the server has closed (Ctrl-C) and everything is written; a model may still be loading on
    # one of gradio's worker threads, and Python's shutdown under it aborts the process (a C++
    # "terminate called"): leave without that shutdown, as sample.py does
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
