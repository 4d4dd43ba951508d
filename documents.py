"""What one document of a text file is in documents mode (prepare.py --documents=line|blank):
prepare.py cuts its input into documents with split_documents, and eval.py cuts a text it
scores the same way, so that a model trained on documents reads them as it trained.
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

