/* Internals of the VM handle, shared by the runtime's C files (not by devices). */
#ifndef FL_VMM_H
#define FL_VMM_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "devices.h"
#include "include/flotilla.h"
#include "virtio/virtio.h"

/* Ports of the machine model (docs/machine.md). */
#define FL_PORT_DEBUG_EXIT 0xf4
#define FL_PORT_I8042_DATA 0x60
#define FL_PORT_I8042_CMD 0x64
#define FL_PORT_PIC1 0x20
#define FL_PORT_PIC2 0xa0
#define FL_PORT_COM1 0x3f8
#define FL_IRQ_COM1 4
#define FL_IRQ_I8042 1
#define FL_GSI_POWER_BUTTON 5 /* the ACPI GED's interrupt (edge, active high) */
#define FL_PORT_PVPANIC 0x505
#define FL_PORT_SLEEP_CONTROL 0x600
#define FL_PORT_SLEEP_STATUS 0x601
#define FL_PORT_RESET_CONTROL 0xcf9 /* the FADT's RESET_REG */
#define FL_RESET_VALUE 0x06	    /* RST_CPU | SYS_RST, as QEMU's q35 FADT */

/* ---- guest memory ---- */
#define FL_GIB (1ULL << 30)
#define FL_MIB (1ULL << 20)
#define FL_LOW_RAM_MAX (3ULL * FL_GIB) /* RAM above this goes to 4 GiB+ (PCI/APIC hole) */
#define FL_HIGH_RAM_BASE (4ULL * FL_GIB)

struct fl_mem {
	uint8_t *host;
	uint64_t size;	   /* total RAM */
	uint64_t low_size; /* RAM at [0, low_size) */
	int memfd;	   /* -1 when anonymous */
	int file_fd;	   /* a snapshot's memory file mapped copy-on-write, else -1 */
	int log_dirty;	   /* slots registered with KVM_MEM_LOG_DIRTY_PAGES */
};

int fl_mem_init(struct fl_mem *mem, uint64_t size, int use_memfd, char *err, size_t errlen);
/* Guest RAM as a private (copy-on-write) mapping of a snapshot's memory file: pages are read
 * from the file only when first touched. Takes fd (closed by fl_mem_fini). */
int fl_mem_init_file(struct fl_mem *mem, uint64_t size, int fd, char *err, size_t errlen);
void fl_mem_fini(struct fl_mem *mem);
int fl_mem_register(struct fl_mem *mem, int vm_fd, char *err, size_t errlen);
/* Turns KVM dirty logging on for every RAM slot (re-registers them with the flag). */
int fl_mem_log_dirty(struct fl_mem *mem, int vm_fd, char *err, size_t errlen);
/* ORs the pages KVM saw written since the last call into bitmap (one bit per page of the
 * host mapping, low RAM first) and clears KVM's log. */
int fl_mem_collect_dirty(struct fl_mem *mem, int vm_fd, uint64_t *bitmap, char *err,
			 size_t errlen);
/* Host pointer for [gpa, gpa+len) if it lies wholly inside one RAM region, else NULL. */
void *fl_mem_ptr(const struct fl_mem *mem, uint64_t gpa, uint64_t len);

/* ---- vCPUs ---- */
enum fl_vcpu_request { FL_REQ_RUN = 0, FL_REQ_PAUSE = 1, FL_REQ_STOP = 2 };
enum fl_vcpu_state { FL_VCPU_IDLE = 0, FL_VCPU_RUNNING = 1, FL_VCPU_PAUSED = 2, FL_VCPU_DONE = 3 };

struct fl_vcpu {
	struct fl_vm *vm;
	uint32_t id;
	int fd;
	struct kvm_run *run;
	size_t run_size;
	pthread_t thread;
	int thread_started;
	int state;   /* enum fl_vcpu_state, under vm->lock */
	int request; /* enum fl_vcpu_request, under vm->lock */
};

/* ---- the VM ---- */
#define FL_EVENT_QUEUE 32

struct fl_vm {
	char err[256];
	int state; /* enum fl_vm_state, under lock */
	int kvm_fd;
	int vm_fd;
	struct fl_mem mem;
	uint32_t nvcpus;
	struct fl_vcpu *vcpus;
	struct kvm_cpuid2 *cpuid; /* supported CPUID, filtered once */

	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_mutex_t api_lock; /* serializes the public control calls */
	int lock_ready;

	struct fl_bus pio;
	struct fl_bus mmio;
	struct fl_counters counters;

	struct fl_ioapic ioapic;
	uint64_t irq_errors; /* KVM refused an MSI or a routing table (never expected) */
	struct fl_serial serial;
	struct fl_i8042 i8042;
	struct fl_pm pm;
	struct fl_signal_dev pvpanic;
	struct fl_signal_dev debugexit;
	struct fl_signal_dev resetctl;
	int devices_ready;

	/* virtio-mmio slots (virtio_slots.c) */
	struct fl_guest_mem gmem;
	struct fl_virtio_slot {
		struct fl_virtio_dev *dev; /* a struct fl_blk or fl_net, allocated */
		uint64_t base;
		uint32_t gsi;
		int irq_fd; /* eventfd bound to gsi with KVM_IRQFD */
	} virtio[FL_VIRTIO_SLOTS];
	uint32_t nvirtio;
	int disks_unlocked; /* build opens the disks without their lock (a migration target) */

	/* events */
	pthread_mutex_t ev_lock;
	struct fl_event events[FL_EVENT_QUEUE];
	uint32_t ev_head, ev_count, ev_lost;
	int event_fd;
	int terminated; /* a terminal event stopped the machine */

	/* snapshots (snapshot.c) */
	struct fl_snap_track {
		int tracking;	   /* dirty pages are logged since snapshot `base` */
		uint8_t base[16];  /* id of the last snapshot taken or restored */
		uint64_t *pending; /* pages dirtied since base, collected so far (a failed
				      save keeps them for the next) */
		uint64_t *devices; /* pages devices wrote (virtio), since the last collect */
		uint64_t npages;
	} snap;

	/* console input thread; io_gate is held across its read and feed, and by a pause around
	 * the state change, so no input reaches the UART once a pause has returned */
	pthread_mutex_t io_gate;
	int console_in_fd;
	int io_wake_fd;
	int io_stop;
	pthread_t io_thread;
	int io_started;
};

/* Error string helpers: return -err so callers can `return fl_fail(...)`. */
int fl_fail(struct fl_vm *vm, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int fl_errf(char *buf, size_t len, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* kvm.c */
int fl_kvm_create(struct fl_vm *vm);
int fl_kvm_create_irqchip(struct fl_vm *vm);
void fl_kvm_signal_msi(void *ctx, const struct fl_msi *msi);
void fl_kvm_set_routes(void *ctx, const struct fl_msi *msi, const uint8_t *present, uint32_t n);
int fl_kvm_irqfd_bind(struct fl_vm *vm, uint32_t gsi, int fd);
void fl_kvm_destroy(struct fl_vm *vm);

/* events.c */
int fl_events_init(struct fl_vm *vm);
void fl_events_fini(struct fl_vm *vm);
void fl_event_raise(struct fl_vm *vm, uint32_t vcpu, uint32_t kind, int64_t code,
		    const uint64_t *detail, uint32_t ndetail, const char *reason);
/* The vCPU id of the calling thread, or UINT32_MAX outside vCPU threads. */
uint32_t fl_vcpu_current(void);

/* vcpu.c */
int fl_vcpus_create(struct fl_vm *vm);
int fl_vcpus_start(struct fl_vm *vm);
int fl_vcpus_request(struct fl_vm *vm, int request, int wait);
void fl_vcpus_join(struct fl_vm *vm);
void fl_vcpus_destroy(struct fl_vm *vm);
/* Called from a vCPU thread: stop the whole machine after a terminal event. */
void fl_vm_terminate(struct fl_vm *vm);

/* devices wiring (machine.c) */
int fl_devices_init(struct fl_vm *vm, int out_fd);
void fl_devices_fini(struct fl_vm *vm);
int fl_console_start(struct fl_vm *vm);
void fl_console_stop(struct fl_vm *vm);
void fl_console_wake(struct fl_vm *vm);

/* virtio_slots.c */
int fl_virtio_slots_init(struct fl_vm *vm, const struct fl_config *cfg);
void fl_virtio_slots_fini(struct fl_vm *vm);
/* Every disk's volume lock to `want` (FL_BLK_LOCK_*, virtio/blk.h); stops at the first
 * refusal (-EBUSY, the error names the disk), the ones before it changed. */
int fl_virtio_disks_lock(struct fl_vm *vm, int want);
struct fl_blk;
/* The index-th disk (the order of fl_config.disks), or NULL past the last. */
struct fl_blk *fl_virtio_disk(struct fl_vm *vm, uint32_t index);
int fl_virtio_slots_start(struct fl_vm *vm);
void fl_virtio_slots_pause(struct fl_vm *vm, int paused);
void fl_virtio_slots_stop(struct fl_vm *vm);
/* cmdline plus one `virtio_mmio.device=` word per slot (malloc'd; NULL when out of memory
 * or too long, with the error set). */
char *fl_virtio_cmdline(struct fl_vm *vm, const char *cmdline);
int fl_kvm_ioeventfd(struct fl_vm *vm, uint64_t addr, uint32_t datamatch, int fd);

/* vcpu_state.c: a vCPU's state blob without the paused check (the caller holds the
 * machine still) and the check of a blob's framing (untrusted input). */
int fl_vcpu_state_get(struct fl_vm *vm, uint32_t index, void *buf);
int fl_vcpu_state_put(struct fl_vm *vm, uint32_t index, const void *buf);
int fl_vcpu_blob_check(const void *buf, size_t len);

/* Text built up in a caller's buffer, cut to fit (describe.c). */
struct fl_text {
	char *buf;
	size_t len, used;
};
__attribute__((format(printf, 2, 3))) void fl_text_put(struct fl_text *t, const char *fmt, ...);

/* virtio_slots.c: the same for a device blob. */
int fl_device_blob_get(struct fl_vm *vm, uint32_t slot, void *buf);
int fl_device_blob_check(const void *buf, size_t len, uint32_t device_id);
int fl_device_blob_put(struct fl_vm *vm, uint32_t slot, const void *buf);

/* vm.c: builds a configured machine; restoring (snapshot.c) passes RAM already mapped from
 * a memory file and skips the loader (the guest is in that memory). */
int fl_vm_build(struct fl_vm *vm, const struct fl_config *cfg, int memory_fd);
void fl_vm_unbuild(struct fl_vm *vm);
/* fl_vm_pause/fl_vm_resume for a caller that holds api_lock (a migration). */
int fl_vm_pause_locked(struct fl_vm *vm);
int fl_vm_resume_locked(struct fl_vm *vm);

/* x86 */
int fl_cpuid_init(struct fl_vm *vm);
int fl_cpuid_apply(struct fl_vm *vm, struct fl_vcpu *vcpu);
int fl_acpi_build(struct fl_vm *vm, uint64_t *rsdp_gpa);
/* The reset vector at 0xFFFF0: resets through the i8042 (x86/resetvec.c). */
int fl_reset_vector_write(struct fl_vm *vm);
struct fl_boot {
	uint32_t kind;	  /* enum fl_image_kind */
	uint64_t entry;
	uint64_t boot_info; /* hvm_start_info (PVH) or zero page (Linux) */
};
int fl_boot_load(struct fl_vm *vm, const struct fl_config *cfg, uint64_t rsdp_gpa,
		 struct fl_boot *boot);
int fl_boot_setup_bsp(struct fl_vm *vm, struct fl_vcpu *vcpu, const struct fl_boot *boot);
int fl_lapic_init(struct fl_vm *vm, struct fl_vcpu *vcpu);

#endif
