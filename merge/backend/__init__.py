"""Array backends under every layer: torch imported on first use (:mod:`merge.backend.lazy`), and the few array
operations the streaming kernels need, on torch tensors or numpy arrays (:mod:`merge.backend.arrays`)."""
