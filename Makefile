# The two commands README promises on a fresh Debian machine (make demo, make test).
.PHONY: demo test test-hwvirt test-cluster test-chaos lint install

install:
	bash .ci/install

# Every tier, in two runs. First all but hwvirt on two pytest-xdist workers, each given whole
# test files (module fixtures stay shared) and its own private broker: most tests wait on
# processes, brokers and guests rather than on the CPU, so two at a time halve the wall time
# on 2 cores. The chaos suite is in, with its short default run (FLOTILLA_CHAOS_SECONDS=30).
# Then the hwvirt tier, in nested L1s under QEMU TCG on hosts without vmx/svm
# (docs/testing.md): the Linux guests (their console, SMP, disks, NICs, DHCP, save/restore and
# migration) in one L1, the whole control plane started inside another (`hwvirt_stack`:
# flotilla up, create, console, a volume), side by side (~4 minutes; FLOTILLA_HWVIRT_L1S=1
# runs them one after the other, ~8), bounded by FLOTILLA_HWVIRT_TIMEOUT (an L1 whose own
# kernel dies is started again within it). Both runs always run; the first failure's status
# is make's.
TEST_WORKERS ?= 2
FLOTILLA_HWVIRT_TIMEOUT ?= 1200
test: install
	@status=0; \
	.venv/bin/pytest -m "not hwvirt" -n $(TEST_WORKERS) --dist loadfile || status=$$?; \
	FLOTILLA_HWVIRT_TIMEOUT=$(FLOTILLA_HWVIRT_TIMEOUT) \
		.venv/bin/pytest -m hwvirt || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	exit $$status

# Only the broker-cluster tests (also part of `make test`).
test-cluster: install
	.venv/bin/pytest -m cluster

# The chaos suite alone, its longer run (docs/operations.md): FLOTILLA_CHAOS_SECONDS sets its
# length (75 s here unless set, the default in `make test` being 30).
FLOTILLA_CHAOS_SECONDS ?= 75
test-chaos: install
	FLOTILLA_CHAOS_SECONDS=$(FLOTILLA_CHAOS_SECONDS) .venv/bin/pytest -m chaos -s

# The hwvirt tier alone (docs/testing.md), as `make test` runs it;
# FLOTILLA_HWVIRT_MARKERS="hwvirt and not hwvirt_stack" for the Linux guests alone.
FLOTILLA_HWVIRT_MARKERS ?= hwvirt
test-hwvirt: install
	.venv/bin/pytest -m "$(FLOTILLA_HWVIRT_MARKERS)"

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# The all-in-one demo: `flotilla up` in the background (private broker, API, scheduler, network
# and storage services, one compute node, in a temp state dir on a free port), then, through the
# API with `flotilla`: the host, the storage pool and the default NAT network, a live SSE event
# stream, a volume, the test guest defined with a NIC on the default network, the volume attached
# as its disk, the guest booted (DHCP lease, pings to the gateway, a pattern written to the disk
# and read back: on its console), a few actions, delete; then `flotilla up` is stopped by its
# pid and everything it started ends with it.
demo: install
	@set -e; PATH="$(CURDIR)/.venv/bin:$$PATH"; \
	state=$$(mktemp -d /tmp/flotilla-demo.XXXXXX); F="flotilla --state-dir $$state"; \
	flotilla up --state-dir "$$state" --listen 127.0.0.1:0 >"$$state/up.log" 2>&1 & up=$$!; \
	trap 'kill -TERM $$up 2>/dev/null; wait $$up; tail -n 2 "$$state/up.log"; rm -rf "$$state"' EXIT; \
	while [ ! -s "$$state/cli.json" ]; do \
		kill -0 $$up 2>/dev/null || { cat "$$state/up.log"; exit 1; }; sleep 0.2; done; \
	echo "== flotilla up"; sed -n '/^Flotilla is up/,$$p' "$$state/up.log"; \
	echo "== flotilla hosts"; $$F hosts; \
	echo "== flotilla pool-list"; $$F pool-list; \
	echo "== flotilla net-list"; $$F net-list; \
	echo "== flotilla events --follow (in the background: the API's SSE stream)"; \
	$$F events --follow & ev=$$!; sleep 0.5; \
	echo "== flotilla vol-create demo-disk 64M"; $$F vol-create demo-disk 64M; \
	echo "== flotilla create -f demo.yaml --no-start (the test guest, 2 vCPUs, 128 MiB, a NIC on default)"; \
	printf 'name: demo\nvcpus: 2\nmemory_mib: 128\nboot:\n  kernel: %s\n  cmdline: "%s"\nnics:\n  - network: default\n' \
		"$$(python -m native.testguest)" \
		"ready smp net=dhcp ping=192.168.122.1,3,100 blkwrite=0,64,7 blkverify=0,64,7" \
		>"$$state/demo.yaml"; \
	cat "$$state/demo.yaml"; $$F create -f "$$state/demo.yaml" --no-start; \
	echo "== flotilla attach-disk demo demo-disk vda"; $$F attach-disk demo demo-disk vda; \
	echo "== flotilla start demo"; $$F start demo; sleep 2; \
	echo "== flotilla console demo"; $$F console demo; \
	echo "== flotilla domiflist demo"; $$F domiflist demo; \
	echo "== flotilla suspend / resume / reboot / shutdown / delete"; \
	$$F suspend demo; $$F resume demo; $$F reboot demo; $$F shutdown demo; $$F delete demo; \
	$$F vol-delete demo-disk; \
	sleep 1; kill $$ev; wait $$ev 2>/dev/null || true; \
	echo "== stopping flotilla up"
