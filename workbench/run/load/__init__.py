"""Load generation: open-loop arrivals and closed-loop users over HTTP."""
