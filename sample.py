"""Sample text from a trained model: one shot, several samples, or an interactive prompt.

    python sample.py --out_dir=out-shakespeare-char --prompt="ROMEO:"
    python sample.py --out_dir=out --prompt=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out --interactive          # a `>> ` prompt; quit, Ctrl-D or Ctrl-C leave
    python sample.py --out_dir=out --stats --use_cache=false   # tokens/s on stderr, without the KV cache
    python sample.py --init_from=gpt2-xl --prompt="Hello"    # OpenAI's GPT-2, or any Hugging Face GPT-2 folder

Everything comes from <out_dir>/ckpt.pt (or the --init_from folder): the weights, the model's
shape and the tokenizer, so nothing in data/ is needed. Standard output holds only the text; the precision choice and
--stats go to standard error, so `python sample.py ... > story.txt` keeps just the story.

- Streaming: text is printed token by token as it is generated. A BPE token can end in the
  middle of a multi-byte character, so the bytes pass through an incremental UTF-8 decoder
  that holds a partial character back until it is complete: no broken characters mid-stream.
- Several samples are generated as one batch (one forward pass per step for all of them):
  the first streams as it is generated, the others are printed when the batch is done,
  each followed by a line of dashes as in nanoGPT.
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
  printed (see stopping.py, which any consumer of generate_stream can use).
- Precision: --dtype=auto picks float32 on CPUs even where training uses bf16 autocast:
  decoding one token at a time is a chain of small matrix-vector products, where autocast's
  casts cost more than they save (measured ~2x slower). GPUs keep hardware.resolve's choice.
- Fast CPU path: with --dtype=auto on a CPU, generation runs on fast_decode.FastDecoder (a
  static KV cache and a lean step; block matrices in float32 or int8, whichever measures
  faster on this CPU; --fast_weights chooses). The choice is printed on stderr. An explicit
  --dtype=float32 keeps the exact float32 path of model.py, the reference. --compile compiles
  that path's one-token step (torch.compile; kept in inductor's on-disk cache for the next run).
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoint
import fast_decode
import hardware
import hf_format
import lora
from config import parse_config
from errors import UserError, run_main
from model import GPT, GPTConfig
from stopping import StopCondition
from tokenizer import Tokenizer


@dataclass
class SampleConfig:
    """Settings of sample.py. Names and meanings follow nanoGPT's sample.py."""
    out_dir: str = "out"  # folder holding ckpt.pt, written by train.py
    init_from: str = "resume"  # resume (out_dir/ckpt.pt), a GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 folder
    prompt: str = "\n"  # text to continue; FILE:path reads it from a file
    num_samples: int = 1  # samples to generate, as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = the model's distribution, lower = more likely tokens, 0 = greedy
    top_k: int | None = 200  # sample from the k most likely tokens only; 0 or none = off
    top_p: float = 1.0  # sample from the smallest set of tokens whose probability reaches p; 1.0 = off
    seed: int = 1337  # random seed: the same seed gives the same samples
    interactive: bool = False  # read prompts line by line at a `>> ` prompt until quit or end of input
    drop_unknown: bool = False  # drop prompt characters a char-level model does not know instead of refusing
    use_cache: bool = True  # KV cache: each new token costs one position, not the whole context
    stats: bool = False  # print generation speed (tokens/s) to stderr
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (float32 on cpu: faster for decoding; bf16 or fp16 on gpus), float32, bfloat16 or float16
    compile: bool = False  # torch.compile: on a CPU the fast path's decoding step (for long generations: ~1 min the first time, then from inductor's cache), elsewhere the model
    cpu_threads: int = 0  # torch threads on cpu; 0 = all cores (2 measured 1.5x faster than 1 on a quiet 2-core host)
    stop: list[str] = field(default_factory=list)  # end a sample at this string, not printed; repeat for several
    fast_weights: str = "auto"  # block matrices of the fast CPU path (dtype auto): auto (faster here), float32 or int8

    def problems(self) -> list[str]:
        """Every setting that cannot work, so all are reported at once before any work."""
        p = []
        if self.num_samples < 1:
            p.append(f"--num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            p.append(f"--max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            p.append(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            p.append(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also false for nan
            p.append(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.cpu_threads < 0:
            p.append(f"--cpu_threads must be >= 0 (0 = all cores), got {self.cpu_threads}")
        if not self.out_dir and self.init_from == "resume":
            p.append("--out_dir must name the folder holding ckpt.pt")
        if any(s == "" for s in self.stop):
            p.append("--stop needs a non-empty string, e.g. --stop=END")
        if self.fast_weights not in ("auto", "float32", "int8"):
            p.append(f"--fast_weights must be auto, float32 or int8, got {self.fast_weights!r}")
        return p


# ---------------------------------------------------------------------------- setup

def choose_precision(device: str, dtype: str) -> hardware.Precision:
    """hardware.resolve, except that dtype auto means float32 on cpu (see the docstring)."""
    precision = hardware.resolve(device, dtype)
    if dtype == "auto" and precision.device_type == "cpu" and precision.dtype != "float32":
        device_reason = precision.reason.partition(", dtype")[0]
        precision = hardware.Precision(precision.device, "float32", (
            f"{device_reason}, dtype float32 (token-by-token decoding on cpu is faster without "
            f"bf16 autocast; --dtype=bfloat16 to override)"))
    return precision


def load_model(out_dir: str, device: str) -> tuple[GPT, Tokenizer, dict]:
    """The model (eval mode, on device) and tokenizer of <out_dir>/ckpt.pt, and the checkpoint."""
    ckpt = checkpoint.load(Path(out_dir) / "ckpt.pt")
    path = Path(out_dir) / "ckpt.pt"
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
    except TypeError as e:
        raise UserError(f"{path} has model_args this code does not know ({e}); "
                        f"it was written by another version of train.py") from None
    # a checkpoint of a compiled model saved without unwrapping has every key prefixed
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = lora.merge_state_dict(state, ckpt.get("lora"))  # a LoRA run's adapters folded into its weights
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{path}: the weights do not match its model_args ({first}); "
                        f"the file is damaged or was edited") from None
    model.eval().to(device)
    tokenizer = Tokenizer.from_description(ckpt["tokenizer"])
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"only {model.config.vocab_size}; the checkpoint is inconsistent")
    return model, tokenizer, ckpt


def choose_decoder(model: GPT, cfg: SampleConfig, precision: hardware.Precision):
    """What generates: fast_decode's CPU path for --dtype=auto on a CPU, else the model itself
    (float32 as requested is the exact reference; GPUs keep the model's path). Both have
    generate_stream(...) with the same arguments and yielded values. --compile compiles the
    fast path's step, or else the model."""
    if precision.device_type != "cpu":
        decoder, how = model, "model.generate_stream (the fast path is for CPUs)"
    elif cfg.dtype != "auto":
        decoder, how = model, "model.generate_stream (exact, as --dtype asked)"
    else:
        decoder, how = fast_decode.decoder_for(model, cfg.num_samples, cfg.fast_weights)
    if cfg.compile and isinstance(decoder, fast_decode.FastDecoder):
        seconds = decoder.compile_step(cfg.num_samples)
        how += f"; its step compiled in {seconds:.1f} s (cache: {os.environ['TORCHINDUCTOR_CACHE_DIR']})"
    elif cfg.compile:
        model.compile(dynamic=True)  # dynamic: the cached context grows every step
        how += "; the model compiled (torch.compile, on its first steps)"
    return decoder, how


def read_prompt(prompt: str) -> str:
    """The prompt text; FILE:path reads it from a file, as in nanoGPT."""
    if not prompt.startswith("FILE:"):
        return prompt
    path = Path(prompt[len("FILE:"):])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} not found (from --prompt=FILE:{path})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read prompt file {path}: {e}") from None


def encode_prompt(tokenizer: Tokenizer, text: str, drop_unknown: bool) -> list[int]:
    """Token ids of the prompt; at least one, since generation continues from something."""
    if tokenizer.documents:  # a new document: its boundary token, then the prompt's text
        return [tokenizer.eot_id] + tokenizer.encode(text.lstrip("\n"), drop_unknown=drop_unknown)
    ids = tokenizer.encode(text, drop_unknown=drop_unknown)
    if ids:
        return ids
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]  # BPE: an empty prompt starts a new document
    what = "has no character the model knows" if text else "is empty"
    raise UserError(f"the prompt {what}; give some text, e.g. --prompt='\\n'")


# ---------------------------------------------------------------------------- generation

def generate_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SampleConfig,
                  precision: hardware.Precision, generator: torch.Generator, echo_prompt: bool,
                  stop: StopCondition | None = None):
    """Generate cfg.num_samples continuations of prompt_ids as one batch and yield the text of
    the first as it grows: the prompt (when echo_prompt), then more after each token that
    completes a character. Each sample ends at its document's end (a documents model), at a
    cfg.stop string, or after cfg.max_new_tokens; `stop` (made here when None) tracks that
    and, once the generator is done, holds every sample's text (stop.text(b)) and the steps
    taken. sample.py prints this text and app.py streams it to a web page: the same settings
    and seed give the same text in both."""
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=precision.device)  # (B, T)
    if stop is None:
        stop = StopCondition.for_model(tokenizer, cfg.num_samples, cfg.stop)
    # the prompt as the model reads it (unknown characters dropped); not the boundary token
    # a new document (or an empty BPE prompt) starts from
    shown_prompt = [i for i in prompt_ids if i != tokenizer.eot_id and i < tokenizer.vocab_size] if echo_prompt else []
    text = tokenizer.decode_bytes(shown_prompt).decode("utf-8", errors="replace")
    yield text
    tokens = model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k or None, top_p=cfg.top_p,
                                   generator=generator, use_cache=cfg.use_cache)
    while not stop.all_done:  # until every sample reached its end
        # autocast is entered per step, not around the loop: a web server may resume this
        # generator on another thread, and autocast state belongs to a thread
        with precision.autocast():
            next_id = next(tokens, None)
        if next_id is None:
            break
        stop.update(next_id.tolist())  # the one host sync per step, which streaming needs anyway
        if piece := stop.new_text(0):  # the first sample streams
            text += piece
            yield text
    stop.finish()
    if piece := stop.new_text(0):
        yield text + piece


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
        shown_prompt = [i for i in prompt_ids if i != tokenizer.eot_id and i < tokenizer.vocab_size] if echo_prompt else []
        prompt_text = tokenizer.decode(shown_prompt)
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


def interactive(model, tokenizer, cfg, precision, generator, out):
    """Complete each line typed at the `>> ` prompt until quit, end of input or Ctrl-C."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    try:
        while True:
            try:
                line = input(">> ")
            except EOFError:
                out.write("\n")
                break
            if line.strip() in ("quit", "exit"):
                break
            if not line:
                continue
            try:
                prompt_ids = encode_prompt(tokenizer, line, cfg.drop_unknown)
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
    cfg, _ = parse_config(SampleConfig, argv, prog="sample.py")
    prompt_text = None if cfg.interactive else read_prompt(cfg.prompt)  # a bad file fails before loading
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    else:
        hardware.set_cpu_threads()
    precision = choose_precision(cfg.device, cfg.dtype)
    if cfg.init_from == "resume":
        model, tokenizer, _ = load_model(cfg.out_dir, precision.device)
    else:  # a Hugging Face GPT-2: ours after export.py, or OpenAI's
        model, tokenizer = hf_format.load(cfg.init_from)
        model.to(precision.device)
    prompt_ids = None if cfg.interactive else encode_prompt(tokenizer, prompt_text, cfg.drop_unknown)
    # only now that the checkpoint and the prompt are good: a mistake gets one line on stderr
    print(f"precision: {precision.reason}", file=sys.stderr)
    decoder, how = choose_decoder(model, cfg, precision)
    print(f"decoding: {how}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=precision.device).manual_seed(cfg.seed)
    out = sys.stdout

    if cfg.interactive:
        interactive(decoder, tokenizer, cfg, precision, generator, out)
        return
    timing = complete(decoder, tokenizer, prompt_ids, cfg, precision, generator, echo_prompt=True, out=out)
    if cfg.stats:
        report_stats(cfg, *timing)

if __name__ == "__main__":
    run_main(main)
