"""When a generated sample ends: at its document's boundary token, or at a stop string.

Any consumer of GPT.generate_stream (sample.py, a web demo) feeds each step's ids (one per
row of the batch) to a StopCondition and prints what it hands back:

    stop = StopCondition.for_model(tokenizer, batch_size, stop_strings=["\\n\\n"])
    for next_id in model.generate_stream(idx, max_new_tokens):
        stop.update(next_id.tolist())
        print(stop.new_text(0), end="")  # row 0, streamed
        if stop.all_done:
            break
    stop.finish()
    print(stop.new_text(0))
    texts = [stop.text(b) for b in range(batch_size)]

A row ends at its first stop id (the boundary token of a documents model) or at the first
occurrence of a stop string in its text; neither is part of the text. Stop strings can span
tokens, so while a row runs, new_text() holds back the end of its text that could still be
the start of a stop string. Bytes go through an incremental UTF-8 decoder per row, so a BPE
token that ends inside a character never prints half of it.
"""
import codecs


class StopCondition:
    """Per-row text and done flags of a batch being generated."""

    def __init__(self, tokenizer, batch_size: int, stop_ids=(), stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)  # a row ends before any of these ids
        self.stop_strings = [s for s in stop_strings if s]  # a row ends before any of these strings
        self.done = [False] * batch_size
        self.texts = [""] * batch_size  # each row's text so far (final once done)
        self.emitted = [0] * batch_size  # characters of each row handed out by new_text
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(batch_size)]
        self.steps = 0  # update() calls: tokens generated per row

    @classmethod
    def for_model(cls, tokenizer, batch_size: int, stop_strings=()) -> "StopCondition":
        """A documents model's samples end at the boundary token; any model's at stop_strings."""
        ids = [tokenizer.eot_id] if tokenizer.documents and tokenizer.eot_id is not None else []
        return cls(tokenizer, batch_size, ids, stop_strings)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def update(self, ids: list[int]) -> bool:
        """Take the next id of every row; returns all_done."""
        self.steps += 1
        for b, i in enumerate(ids):
            if self.done[b]:
                continue
            if i in self.stop_ids:
                self._finish_row(b)
                continue
            if i >= self.tokenizer.vocab_size:  # the model's padding ids: never trained, never text
                continue
            before = len(self.texts[b])
            self.texts[b] += self.decoders[b].decode(self.tokenizer.decode_bytes([i]))
            self._cut_at_stop_string(b, before)
        return self.all_done

    def finish(self):
        """Generation is over (max_new_tokens): every row's text is final."""
        for b in range(len(self.done)):
            if not self.done[b]:
                self._finish_row(b)

    def text(self, b: int) -> str:
        """Row b's text so far (without the stop id or string that ended it)."""
        return self.texts[b]

    def new_text(self, b: int) -> str:
        """Row b's text since the last call that can no longer change: all of it once the
        row is done, otherwise all but an end that could begin a stop string."""
        text = self.texts[b]
        end = len(text) if self.done[b] else len(text) - self._held_back(text)
        new, self.emitted[b] = text[self.emitted[b]:end], max(self.emitted[b], end)
        return new

    def _finish_row(self, b: int):
        if not self.done[b]:
            before = len(self.texts[b])
            self.texts[b] += self.decoders[b].decode(b"", final=True)
            self._cut_at_stop_string(b, before)
            self.done[b] = True

    def _cut_at_stop_string(self, b: int, before: int):
        """End row b at the first stop string, looking only where new text could complete one."""
        text = self.texts[b]
        found = [i for s in self.stop_strings if (i := text.find(s, max(0, before - len(s) + 1))) >= 0]
        if found:
            self.texts[b] = text[:min(found)]
            self.done[b] = True

    def _held_back(self, text: str) -> int:
        """Length of the longest end of text that is the start of a stop string."""
        longest = max((len(s) - 1 for s in self.stop_strings), default=0)
        for k in range(min(longest, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop_strings):
                return k
        return 0
