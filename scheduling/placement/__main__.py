"""``python -m edgesplit.scheduling.placement``: run the benchmark."""
from .bench import _bench

if __name__ == "__main__":
    _bench()
