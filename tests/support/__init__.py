"""What the tests share: LoRA files and their reference merges, a local stand-in for the Hub, and helpers."""
