"""longattn.hamilton (placeholder until its issue lands)."""
