"""Named limits on what a request, its files and its LoRAs may ask for; the README documents each one."""

MAX_INPUT_BYTES = 64 * 1024 * 1024
"""Largest image or map file accepted, in bytes."""

MAX_INPUT_PIXELS = 50_000_000
"""Largest image or map accepted, in pixels (width x height), checked from the header before decoding."""

MIN_STEPS, MAX_STEPS = 1, 16
MAX_SEED = 2**32 - 1
DEFAULT_PROMPT = "a high quality, detailed photograph"
"""What an empty prompt becomes."""
MAX_NUM_OUTPUTS = 4
MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE_SCALE = 3.0
"""Flash-SDXL is trained without classifier-free guidance (a scale of 1): SDXL-typical scales of 5-8 burn the picture,
so the input stops at 3 and a scale above GUIDANCE_WARNING is logged."""
GUIDANCE_WARNING = 2.0

MAX_MAP_GROW = 256
"""Largest map_grow, in pixels at the image's size (a max filter, whose time grows with the radius)."""
MAX_MAP_BLUR = 256
"""Largest map_blur radius, in pixels at the image's size."""

MAP_ASPECT_TOLERANCE = 0.01
"""Relative aspect-ratio difference between map and image still treated as the same aspect."""

MAX_LORA_BYTES = 2 * 1024**3
"""Largest LoRA file (or Replicate training .tar) fetched, in bytes: SDXL LoRAs reach ~1.7 GB at high rank."""

LORA_CACHE_MAX_BYTES = 20 * 1024**3
"""Default total size of the on-disk LoRA cache before least recently used entries are evicted."""

LORA_CACHE_MIN_FREE_BYTES = 10 * 1024**3
"""Default free disk space the LoRA cache keeps by evicting least recently used entries."""

MIN_LORA_SCALE, MAX_LORA_SCALE = -1.0, 3.0
"""Range of lora_scale and extra_lora_scale, as Replicate's SDXL and FLUX models take them."""
