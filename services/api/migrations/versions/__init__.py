"""The registry's revisions, oldest first: NNNN_what.py."""
