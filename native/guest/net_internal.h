/* What net.c shares with the protocols in files of their own (tcp.c): frame helpers, the
 * waiting loop and the interface's address. Not for the rest of the guest (net.h is). */
#ifndef GUEST_NET_INTERNAL_H
#define GUEST_NET_INTERNAL_H

#include "types.h"

#define IP_TCP 6
#define QSIZE 64 /* descriptors per queue */
#define BUF 2048  /* bytes per frame buffer */
#define VHDR 12   /* virtio_net_hdr_v1 */

static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

bool net_up(void);
u32 net_ip(void);  /* host order */
u16 net_mtu(void); /* 0: not from a lease */
/* A free transmit buffer with room for the virtio header, or NULL; tx_send queues a frame
 * built in it (and notifies the device if `kick`), net_tx_kick notifies it. */
u8 *tx_slot(void);
void tx_send(u8 *frame, usize len, bool kick);
void net_tx_kick(void);
/* Ethernet and IPv4 headers for `payload` bytes to `dst`; returns where the payload goes. */
u8 *ip_header(u8 *f, const u8 *dst_mac, u32 dst, u8 proto, usize payload);
/* Serve what comes in until `done(arg)` or the deadline (TSC); false on timeout. */
bool serve_until(bool (*done)(u32), u32 arg, u64 deadline);
const u8 *resolve(u32 ip); /* ARP, asked up to 15 times; NULL if no answer */
u32 next_hop(u32 ip);
bool parse_dest(const char *s, u32 *ip, u64 *port, const char **end); /* a.b.c.d:port */

/* tcp.c */
void tcp_input(const u8 *src_mac, u32 src, const u8 *p, usize n);
void tcp_flush(void);

#endif
