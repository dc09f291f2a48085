/*
 * The snapshot file format (snapshot_file.c): pure functions over bytes, no KVM, so the
 * parser can be fuzzed on its own (native/fuzz/snapshot.c). docs/machine.md describes it.
 *
 * A snapshot is two files. The state file: a header (magic, format version, kind, this
 * snapshot's id and its parent's, section count, file size, a CRC-32C of the header), then
 * sections, each a 24-byte header (type, instance, payload length, a CRC-32C of the header,
 * payload and padding) and its payload padded to 8 bytes. The memory file: guest RAM as the VMM maps it (low RAM,
 * then RAM above 4 GiB), sparse, followed at offset mem_size by a trailer (magic, version,
 * kind, id, parent, mem_size, the runs of pages the file holds for a diff, a CRC-32C).
 * Everything here is read from files a caller hands us: every length is checked.
 */
#ifndef FL_SNAPSHOT_H
#define FL_SNAPSHOT_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define FL_SNAP_MAGIC 0x50414e534c544c46ULL	/* "FLTLSNAP" */
#define FL_SNAP_MEM_MAGIC 0x4d454d534c544c46ULL /* "FLTLSMEM" */
#define FL_SNAP_VERSION 1
#define FL_SNAP_PAGE 4096u
#define FL_SNAP_ID_LEN 16
#define FL_SNAP_MAX_STATE (16u << 20) /* a state file is a few KiB per vCPU */
#define FL_SNAP_MAX_SECTIONS 128
#define FL_SNAP_SLOTS 8

enum fl_snap_kind { FL_SNAP_FULL = 1, FL_SNAP_DIFF = 2 };

enum fl_snap_section {
	FL_SEC_CONFIG = 1,
	FL_SEC_VCPU = 2, /* instance: vCPU index */
	FL_SEC_IOAPIC = 3,
	FL_SEC_SERIAL = 4,
	FL_SEC_I8042 = 5,
	FL_SEC_PM = 6,
	FL_SEC_CLOCK = 7,
	FL_SEC_VIRTIO = 8, /* instance: slot */
	FL_SEC_MAX = 8
};

struct fl_snap_header {
	uint64_t magic;
	uint32_t version;
	uint32_t header_size;
	uint32_t kind;
	uint32_t nsections;
	uint64_t file_size;
	uint8_t id[FL_SNAP_ID_LEN];
	uint8_t parent[FL_SNAP_ID_LEN]; /* a diff's base; zero for a full snapshot */
	uint32_t reserved;
	uint32_t crc; /* CRC-32C of the header with this field zero */
};

struct fl_snap_section_header {
	uint32_t type;
	uint32_t instance;
	uint64_t length; /* payload bytes, before padding */
	uint32_t crc;	 /* CRC-32C of this header (crc 0), the payload and its padding */
	uint32_t reserved;
};

/* The machine a snapshot was taken from: a restore needs the same. */
struct fl_snap_slot {
	uint32_t device_id; /* 1 net, 2 block */
	uint32_t flags;	    /* FL_DISK_READONLY */
	uint64_t capacity;  /* disk: 512-byte sectors */
	uint8_t mac[8];	    /* NIC: 6 bytes */
};

struct fl_snap_config {
	uint32_t nvcpus;
	uint32_t nslots;
	uint64_t mem_size;
	uint64_t low_size;
	uint32_t page_size;
	uint32_t cpuid_crc; /* the CPUID the guest was given */
	struct fl_snap_slot slots[FL_SNAP_SLOTS];
};

struct fl_snap_clock {
	uint64_t clock; /* KVM_GET_CLOCK: kvmclock ns */
	uint32_t flags;
	uint32_t reserved;
};

/* A parsed state file: pointers into the caller's buffer, every length checked. */
struct fl_snap_parsed {
	struct fl_snap_header hdr;
	struct fl_snap_config config;
	const uint8_t *vcpu[64];
	uint64_t vcpu_len[64];
	const uint8_t *section[FL_SEC_MAX + 1]; /* single-instance sections */
	uint64_t section_len[FL_SEC_MAX + 1];
	const uint8_t *virtio[FL_SNAP_SLOTS];
	uint64_t virtio_len[FL_SNAP_SLOTS];
};

/* The memory file's trailer: from offset mem_size to the end of the file, a whole number of
 * pages holding a diff's runs first and this header in its last bytes. */
struct fl_snap_mem_trailer {
	uint64_t magic;
	uint32_t version;
	uint32_t kind;
	uint8_t id[FL_SNAP_ID_LEN];
	uint8_t parent[FL_SNAP_ID_LEN];
	uint64_t mem_size;
	uint64_t nruns; /* diff: runs of pages present in the file (full: 0) */
	uint32_t page_size;
	uint32_t crc; /* CRC-32C of every byte of the trailer before this field */
};

struct fl_snap_run {
	uint64_t first; /* page index */
	uint64_t count; /* pages */
};

uint32_t fl_crc32c(uint32_t crc, const void *buf, size_t len);
/* A section's CRC: its header with crc 0, then its payload padded to 8 bytes (padded must
 * hold that many bytes). */
uint32_t fl_snap_section_crc(const struct fl_snap_section_header *sh, const uint8_t *padded);

/* Builds a state file in a growing buffer. */
struct fl_snap_writer {
	uint8_t *buf;
	size_t len, cap;
	uint32_t nsections;
	int failed; /* out of memory */
};

void fl_snap_writer_init(struct fl_snap_writer *w);
void fl_snap_writer_fini(struct fl_snap_writer *w);
void fl_snap_add(struct fl_snap_writer *w, uint32_t type, uint32_t instance, const void *payload,
		 uint64_t len);
/* Fills in the header; returns 0 or -ENOMEM. */
int fl_snap_finish(struct fl_snap_writer *w, uint32_t kind, const uint8_t *id,
		   const uint8_t *parent);

/* Checks a whole state file: header, every section's bounds and CRC, the sections a
 * machine needs (each once), the config. 0, or -EINVAL with the reason in err. */
int fl_snap_parse(const uint8_t *buf, size_t len, struct fl_snap_parsed *out, char *err,
		  size_t errlen);

/* A machine config from untrusted bytes: vCPUs, memory layout, device kinds in range. */
int fl_snap_check_config(const struct fl_snap_config *c, char *err, size_t errlen);

/* Size of the trailer with nruns runs, rounded up to a page. */
uint64_t fl_snap_trailer_size(uint64_t nruns);
/* Checks a memory file's trailer (buf: the file's bytes from mem_size to its end, len: their
 * count; buf 8-byte aligned). 0, or -EINVAL with the reason. */
int fl_snap_trailer_parse(const uint8_t *buf, size_t len, struct fl_snap_mem_trailer *out,
			  const struct fl_snap_run **runs, char *err, size_t errlen);
/* Fills in the CRC (the last 4 bytes) of a trailer of len bytes: over all bytes before it. */
void fl_snap_trailer_seal(uint8_t *buf, size_t len);

/* ---- the files of a snapshot (snapshot_mem.c; these need the machine) ---- */
struct fl_vm;

/* A temporary file beside path (`<path>.tmp-<pid>`), renamed over it once complete. */
struct fl_snap_tmpfile {
	char path[PATH_MAX];
	char final[PATH_MAX];
	int fd;
};

/* The runs of pages written to a memory file. */
struct fl_snap_runs {
	struct fl_snap_run *r;
	uint64_t n, cap;
	uint64_t pages;
};

int fl_snap_write_all(int fd, const void *buf, size_t len, off_t off);
int fl_snap_read_all(int fd, void *buf, size_t len, off_t off);
int fl_snap_tmp_open(struct fl_snap_tmpfile *t, const char *path, char *err, size_t errlen);
void fl_snap_tmp_discard(struct fl_snap_tmpfile *t);
/* fsync both, rename the memory file, then the state file, fsync the directories. */
int fl_snap_tmp_commit(struct fl_snap_tmpfile *mem, struct fl_snap_tmpfile *state, char *err,
		       size_t errlen);
/* Every page of RAM that holds data / every page in vm->snap.pending, at its own offset. */
int fl_snap_write_full(struct fl_vm *vm, int fd, struct fl_snap_runs *rs, char *err,
		       size_t errlen);
int fl_snap_write_diff(struct fl_vm *vm, int fd, struct fl_snap_runs *rs, char *err,
		       size_t errlen);
/* Every page set in bm, at its own offset; its runs appended to rs and its count added to
 * *pages where those are not NULL. */
int fl_snap_write_bitmap(struct fl_vm *vm, int fd, const uint64_t *bm, struct fl_snap_runs *rs,
			 uint64_t *pages, char *err, size_t errlen);
/* The runs of pages set in bm (npages bits), appended to rs in order; 0 or -ENOMEM. */
int fl_snap_runs_from_bitmap(const uint64_t *bm, uint64_t npages, struct fl_snap_runs *rs);
/* Sizes the file to mem_size plus the trailer and writes the trailer (a diff's runs). */
int fl_snap_write_trailer(int fd, uint64_t mem_size, uint32_t kind, const uint8_t *id,
			  const uint8_t *parent, const struct fl_snap_runs *rs);
/* Opens a memory file and checks its trailer: the fd, or -errno with the reason in err. A
 * diff's runs are copied to *runs when runs is not NULL (the caller frees them). */
int fl_snap_open_memory(const char *path, struct fl_snap_mem_trailer *t,
			struct fl_snap_run **runs, char *err, size_t errlen);

/* ---- shared with live migration (migrate_*.c), which sends the same state in memory ---- */
struct fl_nic_config;
struct fl_config;
int fl_snap_page_is_zero(const uint8_t *p);
/* The machine a state section describes (vCPUs, memory layout, devices, CPUID). */
int fl_snap_machine_config(struct fl_vm *vm, struct fl_snap_config *c);
int fl_snap_cpuid_crc(struct fl_vm *vm, uint32_t *crc);
/* Every section of a paused machine's state into w (the caller finishes it). */
int fl_snap_collect_state(struct fl_vm *vm, struct fl_snap_writer *w);
/* Checks a parsed state against cfg (NIC MACs of zeros take the saved ones, in nics) without
 * touching KVM; then applies it to a built, not started machine. */
int fl_snap_check_machine(struct fl_vm *vm, const struct fl_snap_config *c,
			  const struct fl_config *cfg, struct fl_nic_config *nics);
int fl_snap_check(struct fl_vm *vm, const struct fl_snap_parsed *p, const struct fl_config *cfg,
		  struct fl_nic_config *nics);
int fl_snap_apply(struct fl_vm *vm, const struct fl_snap_parsed *p);
/* KVM dirty logging and the devices' dirty bitmap, on without making a diff base; collect
 * ORs what was logged since the last collect into out (and into the diff-snapshot log). */
int fl_snap_log_start(struct fl_vm *vm);
/* Sets the bit of every page of RAM that may hold data (the others are zero), reading none. */
int fl_snap_data_map(struct fl_vm *vm, uint64_t *bitmap, char *err, size_t errlen);
int fl_snap_log_collect(struct fl_vm *vm, uint64_t *out);

#endif
