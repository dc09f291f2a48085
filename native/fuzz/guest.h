/*
 * The driver side of virtio-mmio for the device targets: a small guest RAM in two regions
 * (as a machine with RAM above 4 GiB has), register accesses through the real MMIO handler,
 * and the device thread's loop body run synchronously, so one input is one deterministic
 * run. Nothing here re-implements a device: it only plays the guest and the worker.
 */
#ifndef FL_FUZZ_GUEST_H
#define FL_FUZZ_GUEST_H

#include <stdint.h>

#include "../virtio/virtio.h"
#include "input.h"

#define FZ_RAM_LOW (48 * 1024)
#define FZ_RAM_HIGH (16 * 1024)
#define FZ_RAM_SIZE (FZ_RAM_LOW + FZ_RAM_HIGH)
#define FZ_HIGH_GPA (1ULL << 32)

extern uint8_t fz_ram[FZ_RAM_SIZE];
extern struct fl_guest_mem fz_mem;

/* Clears RAM and copies what is left of the input into it (from guest-physical 0 on). */
void fz_ram_fill(struct fz_input *in);
/* A guest-physical address from 2 bytes of input plus a bit choosing the high region. */
uint64_t fz_gpa(uint16_t low, int high);

uint32_t fz_mmio_read(struct fl_virtio_dev *d, uint64_t off);
void fz_mmio_write(struct fl_virtio_dev *d, uint64_t off, uint32_t v);

/* What a driver does to bring the device up: reset, ACKNOWLEDGE|DRIVER, accept VERSION_1
 * plus the offered low feature bits in features_lo, FEATURES_OK, program each queue from
 * the input and DRIVER_OK. Per queue: a shape byte (bits 0-3: log2 of the size, taken
 * modulo 9; bits 4, 5, 6: desc, avail, used in the high region), then the desc, avail and
 * used addresses (2 bytes each). */
void fz_driver_up(struct fl_virtio_dev *d, uint32_t features_lo, struct fz_input *in);
/* The device thread's loop body: serve every notified queue that is live, then the extra
 * fd when the device asked for it. */
void fz_serve(struct fl_virtio_dev *d);
/* Invariants of the transport that no register sequence may break. */
void fz_check_transport(const struct fl_virtio_dev *d);

#endif
