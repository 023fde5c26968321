"""User LoRAs and the Flash-SDXL fuse: sources, the pinned HTTP client, files, the cache, formats, merging, and a
request's LoRAs."""
