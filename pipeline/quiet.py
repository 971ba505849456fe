"""Quiet means quiet: ``progress=False`` (``--no-progress``) also silences the progress bars of
huggingface_hub and transformers ("Loading weights", "Writing model shards", downloads).

The two libraries keep one switch each for the whole process; ``quiet(progress)`` turns both off
for the block and back on after it if they were on before, so a notebook's later calls keep
their bars. transformers reads huggingface_hub's switch when it is first imported, so
huggingface_hub (light) is imported here and transformers only if it is loaded already.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(progress: bool) -> Iterator[None]:
    """No hub or transformers progress bar inside the block unless ``progress``."""
    if progress:
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    hub_was_on = not are_progress_bars_disabled()
    tf_was_on = _transformers_bars(None)
    disable_progress_bars()
    _transformers_bars(False)
    try:
        yield
    finally:
        if hub_was_on:
            enable_progress_bars()
        if tf_was_on is not False:  # on before, or transformers first imported in the block
            _transformers_bars(True)


def _transformers_bars(on: bool | None) -> bool | None:
    """transformers' progress switch, set to ``on`` (None: only read); None if not imported."""
    if "transformers" not in sys.modules:
        return None
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    if on is True:
        logging.enable_progress_bar()
    elif on is False:
        logging.disable_progress_bar()
    return was
