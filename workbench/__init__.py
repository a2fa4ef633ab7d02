"""Operations workbench for the Rating API Edge: launch clusters, inject load and faults, check invariants."""

__version__ = "0.1.0"
