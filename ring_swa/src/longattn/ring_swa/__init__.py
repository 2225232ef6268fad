"""longattn.ring_swa (placeholder until its issue lands)."""
