"""Privacy: differential privacy (clipping, noise, adaptive clipping) and the arithmetic of secure aggregation."""
