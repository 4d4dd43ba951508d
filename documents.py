"""What one document is in a text file, for the stages that read text as documents: prepare.py
(--documents=line|blank) and eval.py (per-document scores). Plain Python, no torch, so that
prepare.py and its worker processes start fast.
"""
import itertools


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
