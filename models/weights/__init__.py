"""The weights folder: where its files come from (sources), what it holds (manifest), how it is built and loaded."""
