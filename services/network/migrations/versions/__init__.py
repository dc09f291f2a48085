"""The network catalog's revisions, oldest first: NNNN_what.py."""
