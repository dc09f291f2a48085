/*
 * The live-migration stream (docs/migration.md): pure functions over bytes, no KVM, no
 * sockets, so the target's parser can be fuzzed on its own (native/fuzz/migrate.c).
 *
 * Source → target: a fixed-size hello (magic, version, flags, the one-time token), then
 * records, each a 16-byte header (type, flags, payload length) and its payload. Target →
 * source: records of the same framing (ACK, READY, RESUMED, ERROR). Every field the peer
 * sends is checked here before use: a page index against the guest's page count, a length
 * against the record type's exact or largest size.
 */
#ifndef FL_MIGRATE_H
#define FL_MIGRATE_H

#include <stddef.h>
#include <stdint.h>

#include "snapshot.h"

#define FL_MIG_MAGIC 0x5247494d4c544c46ULL /* "FLTLMIGR" */
#define FL_MIG_VERSION 2	       /* 2: DISKS and BLOCK records, END with the disks */
#define FL_MIG_VERSION_MIN 1	       /* a version-1 peer (an older release, no block copy) */
#define FL_MIG_TOKEN_LEN 32
#define FL_MIG_PAGE 4096u
#define FL_MIG_MAX_BATCH 256u	       /* pages in one PAGES record (1 MiB) */
#define FL_MIG_MAX_ERROR 240u	       /* an ERROR or ABORT record's text */
#define FL_MIG_HELLO_DEBUG 1u	       /* PAGES records carry a checksum per page */
#define FL_MIG_MAX_DISKS 4u	       /* FL_MAX_DISKS */
#define FL_MIG_CHUNK (64u * 1024u)     /* a copied disk's granule (FL_BLK_CHUNK) */
#define FL_MIG_MAX_BLOCK (1024u * 1024u) /* bytes of disk in one BLOCK record (16 chunks) */

struct fl_mig_hello {
	uint64_t magic;
	uint32_t version;
	uint32_t flags; /* FL_MIG_HELLO_* */
	uint8_t token[FL_MIG_TOKEN_LEN];
};

enum fl_mig_record {
	/* source → target */
	FL_MIG_CONFIG = 1, /* struct fl_snap_config: the machine; the target refuses another */
	FL_MIG_PAGES = 2,  /* struct fl_mig_pages, [count × u64 checksums,] count pages */
	FL_MIG_ZERO = 3,   /* struct fl_mig_pages: count pages that are zero now */
	FL_MIG_PAUSED = 4, /* struct fl_mig_paused: the source paused; the last bytes follow */
	FL_MIG_STATE = 5,  /* a snapshot state file (snapshot_file.c), in memory */
	FL_MIG_END = 6,	   /* struct fl_mig_end: nothing more; load and say READY */
	FL_MIG_COMMIT = 7, /* empty: the target resumes the guest, the source keeps it paused */
	FL_MIG_ABORT = 8,  /* text: the source gave up and runs on; the target discards */
	FL_MIG_SYNC = 9,   /* empty: answer SYNCED once everything before it is in RAM */
	FL_MIG_DISKS = 10, /* struct fl_mig_disks: right after CONFIG when the machine has disks */
	FL_MIG_BLOCK = 11, /* struct fl_mig_block, [u64 checksum,] length bytes of a copied disk */
	/* target → source */
	FL_MIG_ACK = 16,     /* struct fl_mig_ack: token and config accepted, machine built */
	FL_MIG_READY = 17,   /* struct fl_mig_ready: everything loaded, vCPUs not started */
	FL_MIG_RESUMED = 18, /* struct fl_mig_resumed */
	FL_MIG_ERROR = 19,   /* text: why the target refused or failed */
	FL_MIG_SYNCED = 20,  /* empty: the answer to SYNC */
};

struct fl_mig_record_header {
	uint32_t type;
	uint32_t flags;
	uint64_t length; /* payload bytes */
};

struct fl_mig_pages {
	uint64_t first; /* page index in the guest's RAM mapping (low RAM first, then high) */
	uint32_t count;
	uint32_t reserved;
};

struct fl_mig_disks {
	uint32_t count; /* the machine's disks */
	uint32_t copy;	/* bit i: disk i is copied through the stream (else shared storage) */
	uint64_t size[FL_MIG_MAX_DISKS]; /* each disk's bytes; 0 past count */
};

struct fl_mig_block {
	uint32_t disk;	 /* a copied disk's index */
	uint32_t reserved;
	uint64_t offset; /* a multiple of FL_MIG_CHUNK */
	uint64_t length; /* 1..FL_MIG_MAX_BLOCK bytes, inside the disk */
};

struct fl_mig_paused {
	uint64_t source_pause_ns; /* the source's CLOCK_MONOTONIC at its pause (same host only) */
};

struct fl_mig_end {
	uint64_t pages; /* pages the source sent in all (a check on the target's count) */
	uint64_t ram_sum; /* debug: the source's checksum of all RAM, else 0 */
	uint64_t disk_bytes; /* bytes of copied disks the source sent in all */
	uint64_t disk_sum[FL_MIG_MAX_DISKS]; /* debug: each copied disk's checksum, else 0 */
};

/* Version 1's END: the first two fields of version 2's. */
struct fl_mig_end_v1 {
	uint64_t pages;
	uint64_t ram_sum;
};

struct fl_mig_ack {
	uint64_t build_ns; /* time the target took to build the machine (not network time) */
};

struct fl_mig_ready {
	uint64_t ram_sum; /* debug: the target's checksum of all RAM, else 0 */
	uint64_t load_ns; /* time the target spent loading the state */
};

struct fl_mig_resumed {
	uint64_t resume_ns;   /* the target's CLOCK_MONOTONIC once its vCPUs run */
	uint64_t downtime_ns; /* the target's measure: PAUSED marker arrival to vCPUs running */
};

/* A page's checksum (64-bit, not cryptographic: it catches a torn or misplaced page). */
uint64_t fl_mig_page_sum(const void *page);
/* All of RAM: page sums chained in page order, one step a page. */
uint64_t fl_mig_sum_step(uint64_t h, uint64_t page_sum);
uint64_t fl_mig_ram_sum(const uint8_t *ram, uint64_t npages);
/* len bytes as whole pages (the last one padded with zeros), page sums chained: a BLOCK
 * record's checksum, and one chunk's step in a disk's. */
uint64_t fl_mig_data_sum(const uint8_t *buf, uint64_t len);

/* Checks a hello: magic, version (FL_MIG_VERSION_MIN to FL_MIG_VERSION: h->version is the
 * stream's from then on), flags, then the token in constant time. 0, or -EPROTO (not a
 * migration stream or another version) / -EACCES (wrong token) with the reason. */
int fl_mig_hello_check(const struct fl_mig_hello *h, const uint8_t *token, char *err,
		       size_t errlen);
/* Checks a record header the source sent: a known type of the stream's `version` and a
 * length its type allows, for a guest of npages pages (debug: PAGES carry checksums). */
int fl_mig_record_check(const struct fl_mig_record_header *r, uint64_t npages, int debug,
			uint32_t version, char *err, size_t errlen);
/* Checks a record header the target sent (the source's side): a known type, its size. */
int fl_mig_reply_check(const struct fl_mig_record_header *r, char *err, size_t errlen);
/* Checks a PAGES or ZERO record's page range against the header and the guest's size. */
int fl_mig_pages_check(const struct fl_mig_record_header *r, const struct fl_mig_pages *p,
		       uint64_t npages, int debug, char *err, size_t errlen);

/* Checks a DISKS record against the disks this side was given (count, sizes in bytes, the
 * copy bits): the two sides must agree on which disks are copied, and on every size. */
int fl_mig_disks_check(const struct fl_mig_disks *d, uint32_t count, const uint64_t *size,
		       uint32_t copy, char *err, size_t errlen);
/* Checks a BLOCK record's range against the header and the copied disks' sizes (the DISKS
 * record both sides agreed on). */
int fl_mig_block_check(const struct fl_mig_record_header *r, const struct fl_mig_block *b,
		       const struct fl_mig_disks *disks, int debug, char *err, size_t errlen);

#endif
