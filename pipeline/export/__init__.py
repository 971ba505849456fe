"""B's dictionary out of the store: an SAE on B's hook that sae-lens loads, steering vectors, and
the figures that measure it (``xprobe export``)."""
