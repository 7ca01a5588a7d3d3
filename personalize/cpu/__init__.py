"""The CPU fast paths: C kernels, 8-bit weights, the fast decoder and the fast trainer."""
