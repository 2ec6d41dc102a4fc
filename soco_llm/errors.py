"""One exception type for every user-facing problem; the CLI prints it as one line."""


class SocoError(Exception):
    """A problem with the user's input or files. The message names the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error
    quotes of a library's own, often multi-line, message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
