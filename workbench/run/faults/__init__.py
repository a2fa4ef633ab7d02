"""Fault injection backends: the TCP proxy mesh every host can run."""
