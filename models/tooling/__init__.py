"""Development tooling: test weights, the Cog-server client, benchmarks and measurements, the GPU check, wheels and
release staging.

Never imported by serving code (tests/test_layout.py checks that predict.py loads none of it) and left out of the
image by .dockerignore. Each tool is functions that return data, with a `main(argv)` that `scripts/<name>` calls.
"""
