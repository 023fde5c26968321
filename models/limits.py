"""Named limits on what a request may ask for; the README documents each one."""

MAX_INPUT_BYTES = 64 * 1024 * 1024
"""Largest image or map file accepted, in bytes."""

MAX_INPUT_PIXELS = 50_000_000
"""Largest image or map accepted, in pixels (width x height), checked from the header before decoding."""

MIN_STEPS, MAX_STEPS = 1, 16
MAX_NUM_OUTPUTS = 4
MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE_SCALE = 20.0

MAP_ASPECT_TOLERANCE = 0.01
"""Relative aspect-ratio difference between map and image still treated as the same aspect."""
