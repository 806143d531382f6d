"""edgesplit.compression."""
