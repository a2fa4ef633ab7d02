"""Test tooling shared by the browser tests, the screenshot script and the browser benchmarks.

Not part of the product: ``browser`` starts Debian's Chromium through Playwright (no browser
download), ``lab`` runs a JupyterLab (or Voila) server on loopback and drives notebooks in it.
"""
