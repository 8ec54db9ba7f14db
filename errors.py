"""The one error type users can cause."""


class TinyVError(Exception):
    """A problem with the user's input (path, image, checkpoint, option).

    The message says what was wrong and what to do; the CLI prints it as one line.
    """
