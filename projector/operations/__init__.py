"""What operators ask for: requests and pauses, rebuilds, offset resets, verify, status, DLQ replay."""
