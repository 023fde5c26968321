"""The user's commands: `scripts/edit` and `scripts/download-weights` call one `main(argv)` here."""
