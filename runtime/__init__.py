"""edgesplit.runtime."""
