"""Read models: their definitions and their maintenance."""
