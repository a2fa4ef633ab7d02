"""Judging a history: pure functions of a Recording, shared by the verdict and the live view."""
