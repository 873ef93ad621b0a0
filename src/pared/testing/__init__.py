"""Toy models and helpers shared by pared's tests (and usable by technique authors)."""
