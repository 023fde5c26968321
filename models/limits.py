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

MAX_LORA_HEADER_BYTES = 8 * 1024**2
"""Largest JSON header of a LoRA file: a LyCORIS LoKr on every SDXL layer, text encoders included, lists about 17,000
tensors in about 3 MB. The safetensors format allows 100 MB, which would be read whole before a name is looked at."""

MAX_LORA_TENSORS = 30_000
"""Most tensors a LoRA file may list: SDXL has about 2,900 layers a LoRA can adapt, and no layout stores more than
about six tensors a layer."""

MAX_LORA_ALPHA = 1e6
"""Largest alpha (or lora_alpha) a file may state; SimpleTuner's LoKr preset stores 10,000."""

MAX_LORA_DOWNLOAD_S = 900.0
"""Default seconds a LoRA download may take in all ($LORA_DOWNLOAD_TIMEOUT): 2 GiB at 2.4 MB/s."""

LORA_CACHE_MAX_BYTES = 20 * 1024**3
"""Default total size of the on-disk LoRA cache before least recently used entries are evicted."""

LORA_CACHE_MIN_FREE_BYTES = 10 * 1024**3
"""Default free disk space the LoRA cache keeps by evicting least recently used entries."""

MIN_LORA_SCALE, MAX_LORA_SCALE = -1.0, 3.0
"""Range of lora_scale and extra_lora_scale, as Replicate's SDXL and FLUX models take them."""
