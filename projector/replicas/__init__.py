"""Replica tables: applying a batch (per message and fast path), the replica catalog, snapshot sweeps, topic identity, the signal table."""
