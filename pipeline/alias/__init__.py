"""``import xprobe``: the distribution's name as an import name, for ``pipeline``.

pyproject.toml installs this folder as the top-level package ``xprobe`` (``package-dir``), so
the card's top level keeps its two packages and no third folder. Importing it puts ``pipeline``
itself in its place: ``xprobe is pipeline``, ``xprobe.direction is pipeline.direction``.
Submodules keep their ``pipeline`` names (``from pipeline.results import direction``).
"""

import sys

import pipeline

sys.modules[__name__] = pipeline
