"""Change maps: shaping them, and making them from a file, the picture's transparency or a larger canvas."""
