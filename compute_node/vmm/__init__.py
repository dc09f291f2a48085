"""The per-guest VMM process and its client (docs/vmm.md).

`python -m compute_node.vmm <domain-dir>` runs one guest: `__main__` (pid lock, control
socket), `loop` (the selector loop and connections), `operations` (one handler per request),
`guest` (the machine and its lifecycle policies in PowerState terms), `config` (the launch
config both sides share), `protocol` (the typed request/reply records), `frames` (frames and
the journal), `console`. The worker's side is `client`. Nothing is imported here: the VMM
process starts once per guest start and imports only what it uses.
"""
