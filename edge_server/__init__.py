"""Rating API Edge: an aiohttp edge whose token buckets are replicated across regions as CRDTs."""

__version__ = "0.1.0"
