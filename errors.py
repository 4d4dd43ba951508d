"""User errors: one clear line, a non-zero exit, never a traceback.

Every script raises UserError (with the fix in the message) for anything a user can
get wrong, and wraps its main() in run_main(). Other exceptions are our bugs and keep
their traceback.
"""
import sys


class UserError(Exception):
    """A mistake the user can fix. The message names the problem and how to fix it."""


def run_main(main, argv=None):
    """Run main(argv); turn a UserError into `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python sample.py | head`: the reader left, nothing to report
        sys.stderr.close()
        sys.exit(0)
