"""Picture files: reading, writing, what outputs carry from the input, the box reader and colour."""
