"""longattn.hyper (placeholder until its issue lands)."""
