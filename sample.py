"""Sample text from a trained model: one shot, several samples, or an interactive prompt.

    python sample.py --out_dir=out-shakespeare-char --prompt="ROMEO:"
    python sample.py --out_dir=out --prompt=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out --interactive          # a `>> ` prompt; quit, Ctrl-D or Ctrl-C leave
    python sample.py --out_dir=out --interactive --prompt="ROMEO:"   # ... with ROMEO: as its first input
    python sample.py --out_dir=out --stats --use_cache=false   # tokens/s on stderr, without the KV cache
    python sample.py --init_from=gpt2-xl --prompt="Hello"    # OpenAI's GPT-2, or any Hugging Face GPT-2 folder
    python sample.py --out_dir=out-instruct --interactive # trained on JSONL chats: a conversation (docs/finetune.md)

Everything comes from <out_dir>/ckpt.pt (or a Hugging Face folder there, or the --init_from one; loading.py): the weights, the model's
shape and the tokenizer, so nothing in data/ is needed. Standard output holds only the text; the precision choice and
--stats go to standard error, so `python sample.py ... > story.txt` keeps just the story.

- Streaming: text is printed token by token as it is generated. A BPE token can end in the
  middle of a multi-byte character, so the bytes pass through an incremental UTF-8 decoder
  that holds a partial character back until it is complete: no broken characters mid-stream.
- Several samples are generated as one batch (one forward pass per step for all of them):
  the first streams as it is generated, the others are printed when the batch is done,
  each followed by a line of dashes as in nanoGPT. The generation itself (settings, decoder,
  prompt, streaming) is generation.py's, which app.py shares.
- A KV cache makes each new token cost one position's work instead of the whole context;
  --use_cache=false recomputes the context every step (same greedy output, much slower).
- Longer than block_size: the context slides (see GPT.generate_stream in model.py). When
  the window is full, it jumps forward to keep its last block_size // 2 tokens and the
  cache is refilled from them, so generation goes on for any --max_new_tokens, and a prompt
  longer than block_size is read from its last block_size tokens.
- temperature 0 is greedy decoding; top_k above the vocabulary size means all tokens;
  top_k 0 (or none) and top_p 1 are off. The same --seed gives the same samples.
- A model trained on documents (prepare.py --documents=line|blank) reads the prompt as the
  start of a new document (after its boundary token; leading line ends are dropped, so the
  default "\n" and --prompt="" both mean "a new document"), and each sample ends where its
  document ends: --num_samples=20 prints 20 whole documents. --stop=STRING (repeatable)
  ends a sample at a string, for any model; the boundary and the stop string are not
  printed (see stopping.py, which any consumer of generate_stream can use). In it \\n, \\r,
  \\t and \\\\ stand for a line end, a return, a tab and a backslash (--stop="\\n\\n" in any shell).
- Precision: --dtype=auto picks float32 on CPUs even where training uses bf16 autocast:
  decoding one token at a time is a chain of small matrix-vector products, where autocast's
  casts cost more than they save (loading.choose_precision). GPUs keep hardware.resolve's choice.
- Fast CPU path: with --dtype=auto on a CPU, generation runs on fast_decode.FastDecoder
  (model.py's forward with a lean one-token step; block matrices in float32 or int8,
  whichever measures faster on this CPU; --fast_weights chooses). Its step is compiled once
  per model shape and kept in ~/.cache/nanogpt-toolkit, so later runs load it instead of
  compiling: by default where that pays (a kept one, or a long generation), always with
  --compile, never with --compile=false. The choices are printed on stderr. An explicit
  --dtype=float32 keeps the exact float32 path of model.py, the reference.
- On a CUDA GPU with --dtype=auto, each token after the prompt is one replay of a CUDA graph
  of that lean step (fast_decode.GraphDecoder): no hundred kernel launches a token.
  --compile=false keeps the model's own step, --compile=true torch.compiles the model.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while torch imports: one line, no traceback
import gc
gc.disable()  # no garbage collection while torch imports: start-up and exit ~0.3 s faster (docs/speed.md)
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import hardware
from config import parse_config
from documents import not_utf8, text_of
from errors import UserError, run_main
from generation import GenerationConfig, choose_decoder, encode_prompt, generate_text, shown_prompt, too_long
from loading import check_one_model, choose_precision, load, load_hf
from model import GPT
import template
from stopping import StopCondition
from tokenizer import Tokenizer
gc.freeze()  # what the imports made is never traversed again, not even at exit
gc.enable()


@dataclass
class SampleConfig(GenerationConfig):
    """Settings of sample.py. Names and meanings follow nanoGPT's sample.py; the generation's own
    (num_samples, max_new_tokens, temperature, ...) come from generation.GenerationConfig."""
    out_dir: str = "out"  # folder holding ckpt.pt, written by train.py (or a Hugging Face GPT-2 folder)
    init_from: str = "resume"  # resume (out_dir/ckpt.pt), a GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 folder
    prompt: str = "\n"  # text to continue; FILE:path reads it from a file; with --interactive, the first input
    interactive: bool = False  # read prompts line by line at a `>> ` prompt until quit or end of input
    drop_unknown: bool = False  # drop prompt characters a char-level model does not know instead of refusing
    stats: bool = False  # print generation speed (tokens/s) to stderr
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    cpu_threads: int = 0  # torch threads on cpu; 0 = all cores

    def problems(self) -> list[str]:
        """Every setting that cannot work, so all are reported at once before any work."""
        p = super().problems()
        if self.cpu_threads < 0:
            p.append(f"--cpu_threads must be >= 0 (0 = all cores), got {self.cpu_threads}")
        if not self.out_dir and self.init_from == "resume":
            p.append("--out_dir must name the folder holding ckpt.pt")
        return p


# ---------------------------------------------------------------------------- setup

def typed(text: str) -> str:
    """A text from the command line as it was typed: where the locale is not UTF-8 (LC_ALL=C with
    Python's UTF-8 mode off) non-ASCII bytes arrive as lone surrogates; they were UTF-8."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        try:
            return os.fsencode(text).decode("utf-8")
        except (UnicodeError, ValueError):
            return text
    return text


def unescaped(stop: str) -> str:
    """A --stop string with \\n, \\r, \\t and \\\\ read as a line end, a return, a tab and a
    backslash: typed as --stop="\\n\\n", a blank line ends a sample in every shell (cmd.exe types
    no line end)."""
    return re.sub(r"\\([nrt\\])", lambda m: {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[m.group(1)], stop)


def stops_never_written(tokenizer: Tokenizer, stops: list[str]) -> list[str]:
    """Notes for the --stop strings a char-level model cannot write (a character it never saw):
    such a string never ends a sample."""
    if tokenizer.chars is None:  # a byte-level vocabulary writes any text
        return []
    known = set(tokenizer.chars)
    return [f"note: --stop={stop!r} holds {', '.join(map(repr, sorted(set(stop) - known)))}, which this model "
            f"never writes: no sample ends there" for stop in stops if not set(stop) <= known]


def read_prompt(prompt: str) -> str:
    """The prompt text; FILE:path reads it from a file, as in nanoGPT, and as prepare.py reads
    text (documents.as_text: line ends as "\n", no leading byte-order mark)."""
    if not prompt.startswith("FILE:"):
        return typed(prompt)
    name = prompt[len("FILE:"):]
    if not name:
        raise UserError("--prompt=FILE: needs a file name after FILE:, e.g. --prompt=FILE:prompt.txt")
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError(f"could not read prompt file {path}: it is a folder; name a text file in it")
    try:
        raw = path.read_bytes()
        return text_of(raw.decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"prompt file {path} not found (from --prompt=FILE:{path})") from None
    except UnicodeDecodeError as e:
        raise UserError(not_utf8(f"prompt file {path}", raw[:4], e.start, raw.count(b"\n", 0, e.start) + 1)) from None
    except OSError as e:
        raise UserError(f"could not read prompt file {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------- output

def complete(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SampleConfig,
             precision: hardware.Precision, generator: torch.Generator, echo_prompt: bool, out):
    """Generate cfg.num_samples continuations of prompt_ids as one batch; stream the first
    to out and print the others when done. Returns (new tokens per sample, seconds, CPU seconds)."""
    stop = StopCondition.for_model(tokenizer, cfg.num_samples, cfg.stop)  # boundary token, --stop
    shown = ""
    precision.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for text in generate_text(model, tokenizer, prompt_ids, cfg, precision, generator, echo_prompt, stop):
        out.write(text[len(shown):])
        out.flush()
        shown = text
    precision.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    out.write("\n")
    if cfg.num_samples > 1:
        prompt_text = tokenizer.decode(shown_prompt(tokenizer, prompt_ids) if echo_prompt else [])
        out.write("---------------\n")
        for b in range(1, cfg.num_samples):
            out.write(prompt_text + stop.text(b) + "\n---------------\n")
    out.flush()
    return stop.steps, seconds, cpu_seconds


def report_stats(cfg: SampleConfig, n_tokens: int, seconds: float, cpu_seconds: float):
    """Speed on stderr. CPU time next to wall time shows how much of the machine we had:
    on a shared CPU, wall-clock tokens/s falls with the other processes' load."""
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    print(f"{n_tokens} tokens x {cfg.num_samples} sample(s) in {seconds:.2f}s "
          f"({cpu_seconds:.2f}s of CPU time, {torch.get_num_threads()} thread(s)): {rate:.1f} "
          f"tokens/s per sample ({'with' if cfg.use_cache else 'without'} KV cache)", file=sys.stderr)


def chat_turn(model, tokenizer, cfg, precision, generator, out, tmpl: dict, block_size: int,
              history: list[tuple[str, str]], line: str):
    """One exchange of a chat: the history and the new user turn wrapped as the training chats
    were, the oldest exchanges left out when they no longer fit in the block (keeping room for
    the answer), the answer streamed to out and added to history."""
    budget = block_size - min(cfg.max_new_tokens, block_size // 2)
    ids, dropped = template.chat_ids(tokenizer, tmpl, history + [("user", line)], budget, cfg.drop_unknown)
    if dropped:
        print(f"(the {dropped} oldest turns no longer fit in the model's context and are left out)", file=sys.stderr)
        del history[:dropped]
    if note := too_long(len(ids), block_size, instruct=True):
        print(note, file=sys.stderr)
    answer = ""
    for text in generate_text(model, tokenizer, ids, cfg, precision, generator, echo_prompt=False):
        out.write(text[len(answer):])
        out.flush()
        answer = text
    out.write("\n")
    history += [("user", line), ("assistant", answer)]


def interactive(model, tokenizer, cfg, precision, generator, out, instruct: dict | None = None,
                block_size: int = 0, first: str | None = None):
    """Complete each line typed at the `>> ` prompt until quit, end of input or Ctrl-C. A model
    trained on chats (instruct["chat"]) holds a conversation instead (chat_turn); /reset
    forgets it. first (--prompt): the session's first input, shown as if typed."""
    history = []  # a chat's turns so far: (role, text)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    try:
        while True:
            if first is not None:
                line, first = first, None
                out.write(f">> {line}\n")
            else:
                try:
                    line = input(">> ")
                except EOFError:
                    out.write("\n")
                    break
            if line.strip() in ("quit", "exit"):
                break
            if not line or (instruct and not line.strip()):  # nothing to answer: the next line
                continue
            try:
                if instruct and instruct["chat"]:
                    if line.strip() == "/reset":
                        history.clear()
                        print("(a new chat: the turns so far are forgotten)", file=sys.stderr, flush=True)
                    else:
                        chat_turn(model, tokenizer, cfg, precision, generator, out, instruct["template"],
                                  block_size, history, line)
                    continue
                prompt_ids = encode_prompt(tokenizer, line, cfg.drop_unknown, instruct)
            except UserError as e:  # one bad line is no reason to leave
                print(f"error: {e}", file=sys.stderr)
                continue
            timing = complete(model, tokenizer, prompt_ids, cfg, precision, generator,
                              echo_prompt=False, out=out)
            if cfg.stats:
                report_stats(cfg, *timing)
    except KeyboardInterrupt:
        out.write("\n")
    out.flush()


def main(argv=None):
    cfg, explicit = parse_config(SampleConfig, argv, prog="sample.py")
    check_one_model(cfg.init_from, explicit)
    # a bad file fails before loading; --interactive with --prompt: its first input
    cfg.stop = [unescaped(typed(stop)) for stop in cfg.stop]
    prompt_text = read_prompt(cfg.prompt) if not cfg.interactive or "prompt" in explicit else None
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    else:
        hardware.set_cpu_threads()
    precision = choose_precision(cfg.device, cfg.dtype)
    if cfg.init_from == "resume":  # the checkpoint in out_dir (or a Hugging Face folder there)
        model, tokenizer, info = load(cfg.out_dir, precision.device)
    else:  # a Hugging Face GPT-2: ours after export.py, or OpenAI's
        model, tokenizer, info = load_hf(cfg.init_from, precision.device)
    for note in stops_never_written(tokenizer, cfg.stop):
        print(note, file=sys.stderr)
    instruct = info.get("instruct")  # trained on instruction records: the template that wraps a prompt
    if instruct:  # an answer ends at the template's end marker (or the boundary token)
        cfg.stop = [*cfg.stop, *template.stop_strings(instruct["template"])]
    prompt_ids = None if cfg.interactive else encode_prompt(tokenizer, prompt_text, cfg.drop_unknown, instruct)
    if prompt_ids and (note := too_long(len(prompt_ids), model.config.block_size, instruct is not None)):
        print(note, file=sys.stderr)
    # only now that the checkpoint and the prompt are good: a mistake gets one line on stderr
    print(f"precision: {precision.reason}", file=sys.stderr)
    decoder, how = choose_decoder(model, cfg, precision)
    print(f"decoding: {how}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=precision.device).manual_seed(cfg.seed)
    out = sys.stdout

    if cfg.interactive:
        interactive(decoder, tokenizer, cfg, precision, generator, out, instruct, model.config.block_size,
                    first=prompt_text or None)
        return
    # the prompt, then its continuation; an instruction model's answer alone (its prompt went in a template)
    timing = complete(decoder, tokenizer, prompt_ids, cfg, precision, generator, echo_prompt=not instruct, out=out)
    if cfg.stats:
        report_stats(cfg, *timing)


if __name__ == "__main__":
    run_main(main)  # a mistake exits here, through Python's usual exit
    # done, and the output flushed: skip Python's teardown of torch's modules, a tenth of a
    # second of a short run's time that frees nothing the system would not (docs/speed.md);
    # not under a profiler or a coverage tracer, which report at exit
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError as e:  # the reader left: nothing more to say
        if not errors.reader_left(e):
            raise
    if sys.getprofile() is None and sys.gettrace() is None:
        os._exit(0)
