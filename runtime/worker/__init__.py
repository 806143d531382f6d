"""The worker daemon, one loop per file: ``control`` (coordinator link, deploys via ``deploy``),
``dataplane`` (RUN in, outputs out, custody and replay) and ``compute`` (stages); ``daemon``
holds what they share. ``edgesplit worker --help`` lists the settings."""
from .daemon import Worker, WorkerConfig, run_worker

__all__ = ["Worker", "WorkerConfig", "run_worker"]
