"""longattn.tree (placeholder until its issue lands)."""
