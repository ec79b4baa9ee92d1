"""Read models: their definitions, their versions and their maintenance."""
