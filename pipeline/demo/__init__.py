"""The demo application (``xprobe demo``): shipped models in ``data/``, how they were built."""
