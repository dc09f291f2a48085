/*
 * Flotilla native VMM: the public C interface.
 *
 * One opaque handle per virtual machine. Every function that can fail returns 0 (or a
 * count) on success and -errno on failure; the reason is kept in the handle's error string
 * (fl_vm_error). The library never exits, aborts or prints.
 *
 * The region between the cdef markers is read verbatim by cffi (native/_build.py): keep it
 * to plain declarations and integer #defines.
 */
#ifndef FLOTILLA_H
#define FLOTILLA_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define FL_MAX_VCPUS 64
#define FL_MAX_MEMORY_MIB 65536
#define FL_MAX_CMDLINE 4096
#define FL_MAX_DEVICES 32
#define FL_MAX_DISKS 4
#define FL_MAX_NICS 4
#define FL_DISK_READONLY 1
#define FL_DISK_COPY 2 /* a migration target: the source copies this disk into it (block copy) */

/* fl_config.flags */
#define FL_CONFIG_MEMFD 1 /* back guest RAM with a memfd (shareable, snapshot-friendly) */

enum fl_vm_state {
	FL_STATE_NEW = 0,	 /* handle allocated, not configured */
	FL_STATE_CONFIGURED = 1, /* kernel loaded, vCPUs created, not started */
	FL_STATE_RUNNING = 2,
	FL_STATE_PAUSED = 3,	 /* every vCPU parked outside KVM_RUN; state may be saved */
	FL_STATE_STOPPED = 4	 /* vCPU threads ended (terminal event or hard stop) */
};

enum fl_event_kind {
	FL_EVENT_NONE = 0,
	FL_EVENT_POWEROFF = 1,	     /* ACPI S5 or debug exit (code = exit status) */
	FL_EVENT_REBOOT = 2,	     /* i8042 reset, triple fault, KVM reset event */
	FL_EVENT_CRASHED = 3,	     /* pvpanic; the guest keeps running */
	FL_EVENT_INTERNAL_ERROR = 4  /* KVM could not run the guest (detail: exit reason...) */
};

enum fl_shutdown_method {
	FL_SHUTDOWN_CTRL_ALT_DEL = 1, /* scancodes through the i8042 */
	FL_SHUTDOWN_ACPI = 2	      /* ACPI power button (GED interrupt, Notify 0x80) */
};

enum fl_image_kind {
	FL_IMAGE_PVH = 1,     /* ELF with XEN_ELFNOTE_PHYS32_ENTRY */
	FL_IMAGE_BZIMAGE = 2, /* Linux boot protocol, 64-bit entry */
	FL_IMAGE_VMLINUX = 3  /* ELF64 without a PVH note, entered in long mode */
};

struct fl_disk_config {
	const char *path; /* raw image file or block device */
	const char *id;	  /* VIRTIO_BLK_T_GET_ID answer (up to 20 bytes); NULL: empty */
	uint32_t flags;	  /* FL_DISK_READONLY */
};

struct fl_nic_config {
	int tap_fd;	/* the caller's tap (kept open by the caller; made non-blocking) */
	uint8_t mac[6];
};

struct fl_config {
	const char *kernel_path;
	const char *initrd_path; /* NULL: none */
	const char *cmdline;	 /* NULL: empty */
	uint64_t memory_mib;
	uint32_t vcpus;
	int console_out_fd; /* COM1 output; -1 discards */
	int console_in_fd;  /* COM1 input; -1 none */
	uint32_t flags;
	/* virtio-mmio devices, placed disks first, then NICs (docs/machine.md) */
	uint32_t ndisks;
	const struct fl_disk_config *disks;
	uint32_t nnics;
	const struct fl_nic_config *nics;
};

struct fl_event {
	uint32_t kind;	   /* enum fl_event_kind */
	uint32_t vcpu;	   /* vCPU that raised it */
	int64_t code;	   /* POWEROFF: exit status; INTERNAL_ERROR: KVM exit reason */
	uint64_t detail[4];/* INTERNAL_ERROR: suberror, errno, data...; others: raw value */
	char reason[32];   /* "acpi_s5", "debug_exit", "i8042_reset", "triple_fault", ... */
};

struct fl_device_counters {
	char name[16];
	uint64_t reads;
	uint64_t writes;
	uint64_t bytes_in;  /* bytes the guest read from the device */
	uint64_t bytes_out; /* bytes the guest wrote to the device */
};

struct fl_counters {
	uint64_t exits_total;
	uint64_t exits_io;
	uint64_t exits_mmio;
	uint64_t exits_intr; /* KVM_RUN interrupted by a kick */
	uint64_t exits_hlt;
	uint64_t exits_shutdown;
	uint64_t exits_system_event;
	uint64_t exits_internal_error;
	uint64_t exits_other;
	uint64_t unhandled_io;	 /* accesses to ports no device claims */
	uint64_t unhandled_mmio; /* accesses to unbacked, unclaimed addresses */
	uint64_t console_in_bytes;
	uint64_t console_out_bytes;
	uint64_t console_dropped; /* output bytes the console fd refused */
	uint32_t ndevices;
	struct fl_device_counters devices[32];
};

struct fl_image_info {
	uint32_t kind;		 /* enum fl_image_kind */
	uint32_t setup_version;	 /* bzImage: boot protocol version */
	uint64_t entry;		 /* guest-physical entry point */
	uint64_t load_start;	 /* lowest guest-physical byte loaded */
	uint64_t load_end;	 /* one past the highest (memsz included) */
	uint64_t init_size;	 /* bzImage: memory the kernel needs from load_start */
	uint64_t initrd_addr_max;
	uint32_t cmdline_size;	 /* bzImage: largest command line accepted */
	uint32_t nsegments;	 /* ELF: PT_LOAD count */
};

struct fl_vm;

/* Lifecycle */
struct fl_vm *fl_vm_new(void); /* NULL only when out of memory */
const char *fl_vm_error(const struct fl_vm *vm);
int fl_vm_configure(struct fl_vm *vm, const struct fl_config *cfg);
int fl_vm_start(struct fl_vm *vm);
int fl_vm_pause(struct fl_vm *vm);
int fl_vm_resume(struct fl_vm *vm);
int fl_vm_shutdown(struct fl_vm *vm, int method);
int fl_vm_stop(struct fl_vm *vm);
void fl_vm_destroy(struct fl_vm *vm);
int fl_vm_state(const struct fl_vm *vm);

/* Events: the fd becomes readable when events are queued; read them with fl_event_read
 * (1: one event copied, 0: queue empty). */
int fl_event_fd(const struct fl_vm *vm);
int fl_event_read(struct fl_vm *vm, struct fl_event *ev);

/* vCPU state as an opaque, versioned blob of fl_vcpu_state_size() bytes; only while
 * paused. Save returns the blob size; restore validates it (it is untrusted input). */
int fl_vcpu_state_size(void);
int fl_vcpu_save(struct fl_vm *vm, uint32_t index, void *buf, size_t len);
int fl_vcpu_restore(struct fl_vm *vm, uint32_t index, const void *buf, size_t len);

/* Interrupts from outside a vCPU: each 8-byte write to eventfd fd is an edge on IOAPIC
 * pin gsi (0..23), delivered by KVM while the guest has the pin unmasked and dropped while it
 * is masked. The caller keeps fd; the binding lasts as long as the machine. After configure. */
int fl_vm_irqfd(struct fl_vm *vm, uint32_t gsi, int fd);

/* virtio-mmio devices, by slot (0..n-1, disks first). ops: blk reads, writes, errors, 0;
 * net frames received, sent, dropped on receive, dropped on send. */
struct fl_virtio_info {
	char name[16];
	uint32_t device_id; /* 1 net, 2 block */
	uint32_t gsi;
	uint64_t base;	    /* MMIO window */
	uint32_t status;    /* the driver-visible status register */
	uint32_t broken;    /* NEEDS_RESET: a malformed request was seen since the last reset */
	uint64_t malformed; /* malformed requests, ever */
	uint64_t interrupts;
	uint64_t ops[4];
};

int fl_virtio_count(struct fl_vm *vm);
int fl_virtio_info(struct fl_vm *vm, uint32_t slot, struct fl_virtio_info *out);
/* The IOAPIC's, UART's and virtio queues' state as text (native/describe.c), for a guest
 * that stands still; returns its length (cut to fit len - 1), or a negative errno. */
int fl_vm_describe(struct fl_vm *vm, char *buf, size_t len);
/* One line per vCPU, only while paused: run state, RIP (against LSTAR for a kernel place),
 * IF, the local APIC's id, TPR, IRR and ISR vectors and its timer (x86/vcpu_state.c). */
int fl_vm_describe_vcpus(struct fl_vm *vm, char *buf, size_t len);
/* A device's state (transport and queues) as an opaque blob with magic, version and
 * checksum; only while paused. Restore validates it (untrusted input). */
int fl_device_state_size(void);
int fl_device_save(struct fl_vm *vm, uint32_t slot, void *buf, size_t len);
int fl_device_restore(struct fl_vm *vm, uint32_t slot, const void *buf, size_t len);

/* Snapshots (docs/machine.md): a state file (every vCPU, the IOAPIC, serial, i8042, ACPI
 * PM, kvmclock, each virtio device, the machine config; versioned sections with CRC-32C) and
 * a sparse memory file. Save only while paused; each file is written under a temporary name,
 * fsync'd and renamed, the memory file first, so a crash never leaves a pair that passes as
 * valid. FL_SNAPSHOT_DIFF writes only the pages written since the last snapshot this machine
 * took or was restored from (KVM dirty logging plus what its devices wrote); merge it onto
 * that snapshot's memory file to restore it. Restore builds a NEW handle into a CONFIGURED
 * machine (start it to run) with guest RAM mapped copy-on-write from the memory file; cfg
 * gives the console, disks and NICs (the same kinds, order, sizes and MACs as when saved; a
 * NIC MAC of zeros takes the saved one), vcpus/memory_mib 0 or equal to the snapshot's.
 * Anything invalid refuses before KVM is touched and leaves the handle NEW. */
#define FL_SNAPSHOT_DIFF 1
/* FL_SNAPSHOT_LIVE: a running machine is saved while it runs (a paused one as without the
 * flag): RAM is written in passes while the guest runs, each rewriting what the guest wrote
 * during the one before, until a pass is small or stops shrinking; then the machine is
 * paused for the last pages and the state only, and runs again before the files are
 * fsync'd and renamed (FL_SNAPSHOT_KEEP_PAUSED: it stays paused). The snapshot is the
 * machine at that pause. */
#define FL_SNAPSHOT_LIVE 2
#define FL_SNAPSHOT_KEEP_PAUSED 4

struct fl_snapshot_info {
	uint32_t version;
	uint32_t kind; /* 1 full, 2 diff */
	uint32_t vcpus;
	uint32_t ndisks;
	uint32_t nnics;
	uint32_t reserved;
	uint64_t memory_mib;
	uint8_t id[16];
	uint8_t parent[16]; /* a diff's base snapshot */
	uint8_t macs[4][6]; /* the NICs' MACs */
};

struct fl_snapshot_stats {
	uint64_t state_bytes;
	uint64_t memory_pages; /* pages written to the memory file */
	uint64_t memory_runs;  /* pwrite calls for them */
	uint64_t ns_state;     /* collecting device and vCPU state */
	uint64_t ns_memory;    /* finding and writing pages */
	uint64_t ns_sync;      /* fsync and rename */
	uint64_t ns_paused;    /* the machine held paused by the save (without LIVE: all of it) */
	uint64_t pages_paused; /* LIVE: pages written while paused (in memory_pages too) */
	uint32_t passes;       /* LIVE: passes over RAM while the guest ran */
	uint32_t reserved;
};

int fl_snapshot_save(struct fl_vm *vm, const char *state_path, const char *memory_path,
		     uint32_t flags, struct fl_snapshot_stats *stats);
int fl_snapshot_restore(struct fl_vm *vm, const struct fl_config *cfg, const char *state_path,
			const char *memory_path);
int fl_snapshot_info(const char *state_path, struct fl_snapshot_info *info, char *err,
		     size_t errlen);
/* Writes out_memory = base_memory with diff_memory's pages on top (the diff's parent must be
 * the base); out may be base itself (replaced by rename). */
int fl_snapshot_merge(const char *base_memory, const char *diff_memory, const char *out_memory,
		      char *err, size_t errlen);

/* Live migration (docs/migration.md): the source streams a running machine's RAM over a
 * connected socket while it runs, re-sending what the guest dirties until the predicted
 * pause fits the budget, then pauses, sends the last pages and the state, and commits once
 * the target has loaded it all; the target then runs the guest and the source stays paused.
 * Any failure before the commit resumes the source. A handle steers a migration from another
 * thread (budget, bandwidth, cancel) and reports its progress. */
#define FL_MIGRATE_DEBUG 1 /* a checksum of every page checked on arrival, and of all RAM */
#define FL_MIGRATE_NO_THROTTLE 2 /* no auto-converge: the vCPUs are never throttled */
/* Speak stream version 1, for a target of an older release (no block copy: refused when
 * disks are to be copied). */
#define FL_MIGRATE_STREAM_V1 4
#define FL_MIGRATE_TOKEN_LEN 32

enum fl_migrate_phase {
	FL_MIGRATE_SETUP = 1,	 /* connecting, token and config */
	FL_MIGRATE_PRECOPY = 2,	 /* guest running, memory streaming */
	FL_MIGRATE_STOPCOPY = 3, /* guest paused, last pages and state */
	FL_MIGRATE_COMMIT = 4,	 /* target loaded; commit sent */
	FL_MIGRATE_DONE = 5,
	FL_MIGRATE_FAILED = 6
};

struct fl_migrate_progress {
	uint32_t phase;
	uint32_t iteration;
	uint32_t throttle_pct; /* share of each 10 ms slice the vCPUs sleep (auto-converge) */
	uint32_t reserved;
	uint64_t bytes_sent;
	uint64_t pages_sent;
	uint64_t zero_pages;	  /* pages sent as zero runs or skipped as zero */
	uint64_t remaining_bytes; /* dirty at the last collection */
	uint64_t dirty_rate;	  /* bytes/s the guest dirtied in the last iteration */
	uint64_t bandwidth;	  /* bytes/s measured (without the cap's waits) */
	uint64_t predicted_ns;	  /* predicted pause at the last check */
	uint64_t budget_ns;
	uint64_t elapsed_ns;
	uint64_t disk_bytes_sent;	/* of copied disks (included in bytes_sent's count) */
	uint64_t disk_remaining_bytes; /* copied disks' chunks to send (in remaining_bytes) */
};

struct fl_migrate_result {
	uint64_t total_ns;	   /* start to the target's RESUMED */
	uint64_t downtime_ns;	   /* the target's measure: PAUSED marker to its vCPUs running */
	uint64_t source_pause_ns;  /* CLOCK_MONOTONIC of the source's pause */
	uint64_t target_resume_ns; /* the target's CLOCK_MONOTONIC once running */
	uint64_t bytes_sent;
	uint64_t pages_sent;
	uint64_t zero_pages;
	uint64_t final_pages; /* pages sent while paused */
	uint64_t state_bytes;
	uint64_t ram_sum;     /* debug: the RAM checksum both sides agreed on */
	uint64_t load_ns;     /* target: loading the state */
	uint32_t iterations;
	uint32_t throttle_pct; /* the highest applied */
	uint32_t committed;    /* commit sent: the source must never run again on its own */
	uint32_t token_accepted; /* target: the peer presented the token (it is spent) */
	uint32_t vcpus;		 /* target: the machine received */
	uint64_t memory_mib;
	uint8_t macs[4][6];
	uint64_t disk_bytes;  /* bytes of copied disks sent (target: received) */
	uint64_t disk_chunks; /* chunks of them (a chunk sent twice counts twice) */
};

struct fl_migration;
struct fl_migration *fl_migration_new(void); /* NULL only when out of memory */
void fl_migration_free(struct fl_migration *m);
const char *fl_migration_error(const struct fl_migration *m);
void fl_migration_set_budget(struct fl_migration *m, uint64_t downtime_ns);
void fl_migration_set_bandwidth(struct fl_migration *m, uint64_t bytes_per_s); /* 0: no cap */
void fl_migration_cancel(struct fl_migration *m);
/* Target: on the commit leave the machine loaded but not started (a guest paused at the
 * source stays paused: fl_vm_start runs it later) instead of running it. */
void fl_migration_set_start_paused(struct fl_migration *m, int paused);
void fl_migration_progress(struct fl_migration *m, struct fl_migrate_progress *out);
/* Source: the disks (bit i: disk i) whose contents go through the stream (a live block
 * copy: host-local storage); the others are on storage both hosts share. Read when the
 * migration starts; the target's disks say it with FL_DISK_COPY. */
void fl_migration_set_copy_disks(struct fl_migration *m, uint32_t mask);

/* Source: vm RUNNING or PAUSED, fd a connected stream socket (made non-blocking; the caller
 * closes it). Returns 0 once the target runs the guest (vm stays PAUSED); -errno otherwise,
 * with vm as it was (running again if it paused for the last pages) unless res->committed
 * (then the outcome is unknown: vm stays paused). */
int fl_migrate_send(struct fl_vm *vm, struct fl_migration *m, int fd, const uint8_t *token,
		    uint32_t flags, uint64_t timeout_ns, struct fl_migrate_result *res);
/* Target: vm NEW; cfg as for fl_snapshot_restore (console, disks, NICs; vcpus and
 * memory_mib 0 or the source's). Reads the hello and checks the token before anything
 * else. Returns 0 with vm RUNNING (CONFIGURED with the state loaded if the handle says
 * start_paused), or -errno with vm NEW again. */
int fl_migrate_receive(struct fl_vm *vm, struct fl_migration *m, const struct fl_config *cfg,
		       int fd, const uint8_t *token, uint64_t timeout_ns,
		       struct fl_migrate_result *res);

/* Target: answers a connection with an ERROR record saying why (a spent token), reading
 * nothing from it. */
int fl_migrate_refuse(int fd, const char *why);

/* Introspection */
int fl_memory_read(struct fl_vm *vm, uint64_t gpa, void *buf, uint64_t len);
int fl_counters_read(struct fl_vm *vm, struct fl_counters *out);
int fl_kvm_probe(char *err, size_t errlen);

/* Kernel image parsing without KVM (used by the loader and by unit tests). */
int fl_image_parse(const uint8_t *buf, size_t len, struct fl_image_info *info, char *err,
		   size_t errlen);
/* cdef-end */

#endif
