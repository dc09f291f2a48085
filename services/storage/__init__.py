"""The storage service: the catalog of pools and volumes, on the `storage` queue
(docs/storage.md). `flotilla-storage` runs one replica."""
