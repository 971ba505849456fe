"""The one exception type xprobe raises for problems a user can fix."""


class XprobeError(Exception):
    """Something is wrong with the input, the store or the config.

    The message says what is wrong and what to do about it. The CLI prints it without a
    traceback and exits with status 2.
    """
