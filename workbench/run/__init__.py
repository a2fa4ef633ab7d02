"""Making a run happen: processes, cluster, faults, load, drill, notebooks; each writes history records."""
