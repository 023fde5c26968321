"""Training a LoRA from photos: the inputs, the untrusted archive, buckets and captions, the adapters and their kohya
file, the token's embeddings, the loop, and the .tar it all ends in."""
