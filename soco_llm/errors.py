"""One exception type for every user-facing problem; the CLI prints it as one line."""


class SocoError(Exception):
    """A problem with the user's input or files. The message names the problem and the fix."""
