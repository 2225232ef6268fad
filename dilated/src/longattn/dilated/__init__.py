"""longattn.dilated (placeholder until its issue lands)."""
