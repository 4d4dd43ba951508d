"""How a text file is read, and what one document of it is in documents mode (prepare.py
--documents=line|blank).

Every tool reads a text file the same way (as_text): as Python's text mode does, line ends
"\r\n" and a lone "\r" become "\n", and a UTF-8 byte-order mark at the very start of the
file is dropped. prepare.py (every mode), eval.py --input and sample.py --prompt=FILE: all
go through it, so a file saved on Windows trains, scores and prompts like the same text
saved anywhere else, and no model learns "\r" or "\ufeff" as characters.

prepare.py cuts its input into documents with split_documents, and eval.py cuts a text it
scores the same way, so that a model trained on documents reads them as it trained.
"""
import codecs
import io
import itertools

BOM = "\ufeff"  # the UTF-8 byte-order mark some editors write at the start of a file


def as_text(pieces):
    """The pieces of a file's decoded UTF-8 text (in the order read; [text] for a whole
    file) as text mode reads them: "\r\n" and "\r" become "\n", also where a read cuts a
    "\r\n" in two (a trailing "\r" is held back until what follows is seen), and a leading
    byte-order mark is dropped."""
    newlines = io.IncrementalNewlineDecoder(None, translate=True)
    at_start = True
    for piece in itertools.chain(pieces, [None]):  # None: the end of the file
        text = newlines.decode("", final=True) if piece is None else newlines.decode(piece)
        if at_start and text:
            text, at_start = text.removeprefix(BOM), False
        if text:
            yield text


UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # how a UTF-16 text file starts


def not_utf8(what: str, head: bytes, offset: int, line: int) -> str:
    """What to say of a file (named by what) that failed as UTF-8 at byte offset, on line;
    head: its first bytes. UTF-16, what Windows Notepad calls "Unicode" and Windows
    PowerShell's `>` writes, is named as such (its first byte is what fails)."""
    if head.startswith(UTF16_BOMS):
        return (f"{what} is UTF-16 text (Windows Notepad's \"Unicode\", what Windows PowerShell's `>` writes), "
                f"not UTF-8: save it as UTF-8 (Notepad: Save as, Encoding: UTF-8; PowerShell: "
                f"`Get-Content FILE | Set-Content -Encoding utf8 NEWFILE`; elsewhere `iconv -f utf-16 -t utf-8`)")
    return (f"{what} is not UTF-8 text: invalid byte at offset {offset} (line {line}); convert it (a Latin-1 "
            f"file: `iconv -f latin1 -t utf-8`, or Notepad's Save as, Encoding: UTF-8), or mend that byte")


def text_of(decoded: str) -> str:
    """A whole file's decoded UTF-8, read as text (as_text)."""
    return "".join(as_text([decoded]))


def split_documents(pieces, mode: str):
    """The documents in one file's text pieces. line: every line holding more than
    whitespace; blank: runs of such lines, separated by lines of only whitespace (joined by
    "\n"). Line ends ("\n" or "\r\n") are not part of a document."""
    buf, block = "", []  # the unfinished last line; blank mode: lines of the current document
    for piece in itertools.chain(pieces, [None]):  # None: the end of the file
        if piece is None:
            lines, buf = ([buf] if buf else []), ""
        else:
            *lines, buf = (buf + piece).split("\n")
        for line in lines:
            line = line.removesuffix("\r")
            if not line.strip():
                if block:
                    yield "\n".join(block)
                    block = []
            elif mode == "line":
                yield line
            else:
                block.append(line)
    if block:
        yield "\n".join(block)

