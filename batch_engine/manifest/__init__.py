"""The job manifest: its fields, a safe YAML reader, the validator, and the JSON Schema of the fields."""

from batch_engine.manifest.items import fingerprint
from batch_engine.manifest.validate import load_manifest

__all__ = ["fingerprint", "load_manifest"]
