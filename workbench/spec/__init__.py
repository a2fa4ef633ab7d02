"""What to run: the scenario (topology, limits, load, skill, faults) and its flat parameters; pure data."""
