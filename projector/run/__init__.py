"""The run loop and the duties it does between batches."""
