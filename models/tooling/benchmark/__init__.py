"""The benchmark: the serving path against plain diffusers, side by side (run), the baseline (baseline), the FLOP
floor (floor) and the tables (report)."""
