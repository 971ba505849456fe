"""The one exception type xprobe raises for problems a user can fix."""


class XprobeError(Exception):
    """Something is wrong with the input, the store or the config.

    The message says what is wrong and what to do about it. The CLI prints it without a
    traceback and exits with status 2.
    """


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM, SIGHUP: what schedulers, ``kill`` and Kubernetes send),
    raised in the main thread like Ctrl-C, so every ``finally`` runs: the chunks already
    recorded stay, the writer finishes the chunk in flight, the locks are released."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
