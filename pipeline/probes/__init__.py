"""The fitting engine behind ``stages/fit.py``, one question per module:

- ``config``: the fit's configuration (``FitConfig``);
- ``inputs``: what is read per chunk (B's hooks, A's features, A's residual, masks, classes);
- ``accumulate``: how it is accumulated (the one loop, the one checkpoint cadence);
- ``solve``: how it is solved (ridge / GCV, write directions, the map, Latent Scaling);
- ``sae_map``: A's SAE read through the affine map, and the SAE pieces the fit needs;
- ``score``: how it is scored (the held-out pass);
- ``write``: what is written;
- ``engine``: ``Fit``, which ties them together for one config on one store.
"""

from pipeline.probes.config import FitConfig
from pipeline.probes.engine import Fit

__all__ = ["Fit", "FitConfig"]
