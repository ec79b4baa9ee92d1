"""The commit protocol and its ledgers: checkpoints and intents, the transaction ledger, dead letters, the finish line."""
