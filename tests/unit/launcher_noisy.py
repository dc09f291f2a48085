"""Prints as it is imported, as a library's warning might (tests/unit/test_launcher.py)."""

print("a word on stdout at import")
