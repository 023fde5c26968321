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

MAX_MAP_PROMPTS = 8
"""Most comma-separated phrases in map_prompt or map_negative_prompt: CLIPSeg runs once per phrase."""
MAX_MAP_PROMPT_CHARS = 500
"""Longest map_prompt or map_negative_prompt; CLIPSeg reads 77 tokens of each phrase."""

MAX_EXTEND = 2048
"""Most pixels extend_left, extend_right, extend_top or extend_bottom may add (and never more than the picture's own
width or height on that axis: a few-step model invents a margin, not a second picture)."""

MAP_ASPECT_TOLERANCE = 0.01
"""Relative aspect-ratio difference between map and image still treated as the same aspect."""

MAX_LORA_BYTES = 2 * 1024**3
"""Largest LoRA file (or Replicate training .tar) fetched, in bytes: SDXL LoRAs reach ~1.7 GB at high rank."""

MAX_LORA_HEADER_BYTES = 8 * 1024**2
"""Largest JSON header of a LoRA file: the largest layouts on every SDXL layer, text encoders included, list 3,456
tensors in 0.5 MB (ComfyUI's extraction with full differences) and 5,315 in 0.7 MB (a LyCORIS LoKr with DoRA; counted
by tests/loras/test_names.py's writers). The safetensors format allows 100 MB, which would be read whole before a
name is looked at."""

MAX_LORA_TENSORS = 30_000
"""Most tensors a LoRA file may list: SDXL has 1,063 linear, convolution and embedding layers a LoRA can adapt and
1,330 norm weights and biases a full difference can change, and no layout stores more than six tensors a layer."""

MAX_LORA_ALPHA = 1e6
"""Largest alpha (or lora_alpha) a file may state; SimpleTuner's LoKr preset stores 10,000."""

MAX_NEW_TOKENS = 64
"""Most new tokens a LoRA may bring: Replicate's SDXL trainings bring two, and each takes a place of the prompt's 77."""

MAX_TRAINING_EMBEDDINGS_BYTES = 64 * 1024**2
"""Largest embeddings.pti read from a training .tar: its tokens are a few rows of 768 + 1280 floats, kilobytes."""

MAX_TRAINING_WORDS_BYTES = 64 * 1024
"""Largest special_params.json read from a training .tar: a few words and their tokens."""

MAX_LORA_DOWNLOAD_S = 900.0
"""Default seconds a LoRA download may take in all ($LORA_DOWNLOAD_TIMEOUT): 2 GiB at 2.4 MB/s."""

LORA_CACHE_MAX_BYTES = 20 * 1024**3
"""Default total size of the on-disk LoRA cache before least recently used entries are evicted."""

LORA_CACHE_MIN_FREE_BYTES = 10 * 1024**3
"""Default free disk space the LoRA cache keeps by evicting least recently used entries."""

MIN_LORA_SCALE, MAX_LORA_SCALE = -1.0, 3.0
"""Range of lora_scale and extra_lora_scale, as Replicate's SDXL and FLUX models take them."""

MAX_TRAINING_ARCHIVE_BYTES = 4 * 1024**3
"""Largest input_images archive a training accepts."""

MAX_TRAINING_IMAGES = 300
"""Most pictures a training takes: a person, product or style needs 5-50; a few hundred is a small style dataset."""

MAX_ARCHIVE_MEMBERS = 2_000
"""Most entries (pictures, captions, folders, skipped files) an input_images archive may list: its index is read whole
before any member."""

MAX_ARCHIVE_UNPACKED_BYTES = 8 * 1024**3
"""Most bytes an input_images archive may unpack to, as declared and as read: 300 pictures of up to 27 MB."""

MAX_ARCHIVE_RATIO = 100
"""Most an archive or one of its members may expand (unpacked over packed bytes, beyond 1 MiB unpacked): photos barely
compress, a zip bomb expands a thousandfold or more."""

MAX_CAPTION_BYTES = 16 * 1024
"""Largest caption .txt: a prompt reads 77 tokens, a few hundred characters."""

MIN_TRAINING_RESOLUTION, MAX_TRAINING_RESOLUTION = 256, 1536
MAX_TRAINING_STEPS = 10_000
MAX_TRAINING_BATCH = 8
MAX_LORA_RANK = 128
MIN_LEARNING_RATE, MAX_LEARNING_RATE = 1e-6, 1e-2
MAX_TOKEN_CHARS = 32
