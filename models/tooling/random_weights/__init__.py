"""Random SDXL weights in the weights folder's layout, for tests and benchmarks (scripts/make-test-weights)."""
