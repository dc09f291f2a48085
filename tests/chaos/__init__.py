"""The chaos suite: guests cycle through the API while faults are injected (docs/operations.md)."""
