"""Measurements of single features (`scripts/measure <what>`, command.py), each returning a Table."""
