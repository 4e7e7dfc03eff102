"""The engine's own event loop and worker threads (`Runtime`), shared by the asyncio and threaded faces."""

from .runtime import IoRunner, Runtime

__all__ = ["IoRunner", "Runtime"]
