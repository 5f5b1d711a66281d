"""comfywatch: durable job tracking and completion hooks for ComfyUI servers."""

__version__ = "0.1.0"
