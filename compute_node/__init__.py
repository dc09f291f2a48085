"""The per-host worker that runs guests on the native runtime and emits domain events."""
