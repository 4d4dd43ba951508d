"""Generating text from a loaded model, the same way for every script that does (sample.py
prints it, app.py streams it to a web page, bench.py times it): the settings of a generation,
the choice of what decodes, the prompt's tokens and the text as it grows.

- Several samples are generated as one batch (one forward pass per step for all of them); the
  first streams as it is generated.
- Streaming: a BPE token can end in the middle of a multi-byte character, so the bytes pass
  through an incremental UTF-8 decoder (stopping.StopCondition) that holds a partial character
  back until it is complete: no broken characters mid-stream.
- A model trained on documents (prepare.py --documents=line|blank) reads the prompt as the
  start of a new document (after its boundary token; leading line ends are dropped), and each
  sample ends where its document ends; a --stop string ends a sample for any model.
"""
import math
import sys
from dataclasses import dataclass, field

import torch

import fast_decode
import hardware
import template
from errors import UserError, listed
from model import GPT
from stopping import StopCondition
from tokenizer import Tokenizer


@dataclass
class GenerationConfig:
    """The settings of one generation, shared by sample.py's flags and app.py's requests."""
    num_samples: int = 1  # samples to generate, as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = the model's distribution, lower = more likely tokens, 0 = greedy
    top_k: int | None = 200  # sample from the k most likely tokens only; 0 or none = off
    top_p: float = 1.0  # sample from the smallest set of tokens whose probability reaches p; 1.0 = off
    min_p: float = 0.0  # keep only tokens at least min_p times as likely as the most likely one; 0 = off
    repetition_penalty: float = 1.0  # above 1: tokens already in the prompt or sample become less likely; 1.0 = off
    seed: int = 1337  # random seed: the same seed gives the same samples
    use_cache: bool = True  # KV cache: each new token costs one position, not the whole context
    stop: list[str] = field(default_factory=list)  # end a sample at this string, not printed; repeat for several; \n, \r, \t, \\ are a line end, a return, a tab, a backslash
    dtype: str = "auto"  # auto (float32 on cpu: faster for decoding; bf16 or fp16 on gpus), float32, bfloat16 or float16
    compile: bool | None = None  # on a CPU the fast path's decoding step, compiled once per model shape and kept in ~/.cache/nanogpt-toolkit (unset: where it pays, i.e. a kept one, or max_new_tokens x n_layer >= 2000); on a CUDA GPU unset replays the one-token step as a CUDA graph, false runs the model eagerly, true torch.compiles it
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
        if not 0 <= self.min_p <= 1:  # also false for nan
            p.append(f"--min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            p.append(f"--repetition_penalty must be a finite number above 0 (1 = off), got {self.repetition_penalty}")
        if any(s == "" for s in self.stop):
            p.append("--stop needs a non-empty string, e.g. --stop=END")
        if bad_seed := hardware.seed_problem(self.seed):
            p.append(bad_seed)
        if self.fast_weights not in ("auto", "float32", "int8"):
            p.append(f"--fast_weights must be auto, float32 or int8, got {self.fast_weights!r}")
        return p


def choose_decoder(model: GPT, cfg: GenerationConfig, precision: hardware.Precision):
    """What generates: for --dtype=auto, fast_decode's CPU path on a CPU and its CUDA graph of
    the one-token step on a CUDA GPU (--compile unset), else the model itself (a --dtype as
    requested is the exact reference). All have generate_stream(...) with the same arguments
    and yielded values. --compile: the CPU path's step compiled (fast_decode.decoder_for; unset,
    where it pays), or else the model (true only). Returns (decoder, how it decodes, in words)."""
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if precision.device_type == "cuda" and cfg.dtype == "auto" and cfg.compile is None and cfg.use_cache:
        decoder, how = fast_decode.graph_decoder_for(model, precision, cfg.num_samples, log)
    elif precision.device_type != "cpu":
        why = "the fast path is for CPUs" if precision.device_type != "cuda" else (
            "as --dtype asked" if cfg.dtype != "auto" else "without the KV cache" if not cfg.use_cache
            else f"--compile={str(cfg.compile).lower()}")
        decoder, how = model, f"model.generate_stream ({why})"
    elif cfg.dtype != "auto":
        decoder, how = model, "model.generate_stream (exact, as --dtype asked)"
    elif not cfg.use_cache:  # the fast path is a cache: without one, nanoGPT's loop, nothing to compile
        decoder, how = model, "model.generate_stream (without the KV cache: the whole context every token)"
    else:
        decoder, how = fast_decode.decoder_for(model, cfg.num_samples, cfg.fast_weights, cfg.compile,
                                               cfg.max_new_tokens, log=log)
    if cfg.compile and not isinstance(decoder, fast_decode.FastDecoder):
        model.compile(dynamic=True)  # dynamic: the cached context grows every step
        how += "; the model compiled (torch.compile, on its first steps)"
    return decoder, how


def encode_prompt(tokenizer: Tokenizer, text: str, drop_unknown: bool, instruct: dict | None = None) -> list[int]:
    """Token ids of the prompt; at least one, since generation continues from something. A
    model trained on instruction records (instruct: the checkpoint's template) gets the prompt
    as a user turn followed by the assistant marker (template.prompt_ids)."""
    if drop_unknown and tokenizer.chars is not None and (unknown := sorted(set(text) - set(tokenizer.chars))):
        shown = listed(map(repr, unknown), 10)
        print(f"note: --drop_unknown dropped {len(unknown)} character(s) the model never saw: {shown}", file=sys.stderr)
    if instruct:
        if not text.strip():  # as app.py's chat refuses an empty message
            raise UserError("the prompt is empty: an instruction model answers a question or a task; give one "
                            "like those it was trained on")
        # (a prompt file's last line end is the file's, not the question's: the template ends the turn)
        return template.prompt_ids(tokenizer, instruct["template"], text.rstrip("\n"), drop_unknown)
    if tokenizer.documents:  # a new document: its boundary token, then the prompt's text
        # (a document of --documents=line holds no line end: a prompt file's last one is the file's)
        text = text.strip("\n") if tokenizer.documents == "line" else text.lstrip("\n")
        return [tokenizer.eot_id] + tokenizer.encode(text, drop_unknown=drop_unknown)
    ids = tokenizer.encode(text, drop_unknown=drop_unknown)
    if ids:
        return ids
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]  # BPE: an empty prompt starts a new document
    what = "has no character the model knows" if text else "is empty"
    example = known_character(tokenizer.chars if tokenizer.chars is not None else ["A"])  # one this model knows
    raise UserError(f"the prompt {what}; give some text" + (f", e.g. --prompt={example}" if example.isalnum() else
                                                            " it knows, or --prompt=FILE:PATH"))


def too_long(n_ids: int, block_size: int, instruct: bool) -> str | None:
    """A note for a prompt longer than the model's context, whose start the model never reads
    (an instruction model's template with it), else None."""
    if n_ids <= block_size:
        return None
    return (f"note: the prompt is {n_ids} tokens, more than the model's context of {block_size}: it reads only "
            f"the last {block_size}" + (", without the start of the template it was trained with, so the answer "
                                        "will be poor: shorten the question" if instruct else ""))


EXAMPLE_PROMPT, EXAMPLE_QUESTION = "ROMEO:", "What is 2+2?"  # a plain model's example prompt; an instruction model's


def example_prompt(tokenizer: Tokenizer, instruct: dict | None = None) -> str:
    """A prompt to show as an example (a model card's, the page's placeholder): a question for an
    instruction model; ROMEO: where the model knows its characters; else a letter (or another
    character) of a char vocabulary's own."""
    chars = tokenizer.chars  # None for a BPE, which encodes any text
    for example in ((EXAMPLE_QUESTION, "2+2?") if instruct else (EXAMPLE_PROMPT,)):
        if chars is None or set(example) <= set(chars):
            return example
    return known_character(chars)


def known_character(chars: list[str]) -> str:
    """A character of a char vocabulary to show as an example, typed alike in any shell: a letter,
    else a digit, else any character but a space."""
    return next((c for c in chars if c.isalpha()), None) or next((c for c in chars if c.isalnum()), None) or \
        next((c for c in chars if not c.isspace()), chars[0])


def shown_prompt(tokenizer: Tokenizer, prompt_ids: list[int]) -> list[int]:
    """The prompt as the model reads it (unknown characters dropped), without the boundary
    token a new document (or an empty BPE prompt) starts from."""
    return [i for i in prompt_ids if i != tokenizer.eot_id and i < tokenizer.vocab_size]


def generate_text(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], cfg: GenerationConfig,
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
    text = tokenizer.decode_bytes(shown_prompt(tokenizer, prompt_ids) if echo_prompt else []).decode(
        "utf-8", errors="replace")
    yield text
    tokens = model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k or None, top_p=cfg.top_p,
                                   generator=generator, use_cache=cfg.use_cache, min_p=cfg.min_p,
                                   repetition_penalty=cfg.repetition_penalty)
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
