"""Quantized CPU kernels (int4/int8). Nothing here yet: the fp32 path uses torch."""
