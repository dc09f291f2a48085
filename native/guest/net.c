#include "net.h"
#include "net_internal.h"
#include "intr.h"
#include "io.h"
#include "lib.h"
#include "mem.h"
#include "print.h"
#include "uart.h"
#include "time.h"
#include "virtio.h"

#define RXQ 0
#define TXQ 1
#define F_MAC (1UL << 5)
#define F_STATUS (1UL << 16)
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define IP_ICMP 1
#define IP_UDP 17
#define ECHO_PORT 7
#define CLIENT_PORT 40000
#define ARP_SLOTS 8
#define DHCP_CLIENT 68
#define DHCP_SERVER 67
#define DHCP_COOKIE 0x63825363u
#define DHCP_FIXED 240 /* BOOTP header and the magic cookie */
#define PING_ID 0x464c
#define PING_MAX 65536

static struct {
	struct vdev *dev;
	struct vq rx, tx;
	u8 *rxbuf, *txbuf;
	u64 tx_issued, tx_done;
	u8 mac[6];
	u32 ip; /* host order */
	u32 mask, router; /* from a DHCP lease; 0: everything is on the link */
	u16 mtu;
	bool up;
	/* DHCP exchange in progress: the last OFFER/ACK/NAK seen for our xid */
	u32 xid;
	u8 dhcp_type; /* 0 none, 2 OFFER, 5 ACK, 6 NAK */
	bool dhcp_rapid; /* the reply carried Rapid Commit (RFC 4039) */
	u32 dhcp_yiaddr, dhcp_server, dhcp_mask, dhcp_router;
	u16 dhcp_mtu;
	/* ICMP echo client: replies seen, by sequence number */
	u64 ping_got;
	u64 ping_first; /* 1 + sequence number of the first reply, 0 none */
	u8 ping_seen[PING_MAX / 8];
	struct { u32 ip; u8 mac[6]; } arp[ARP_SLOTS];
	unsigned arp_next;
	/* the last UDP datagram to CLIENT_PORT */
	bool reply;
	u32 reply_ip;
	u16 reply_port;
	char reply_data[65];
	u64 rx_frames, tx_frames;
} net;


static u16 csum(const u8 *p, usize n)
{
	u64 s = 0;
	for (usize i = 0; i + 1 < n; i += 2)
		s += get16(p + i);
	if (n & 1)
		s += (u32)p[n - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

static bool parse_ip(const char *s, u32 *ip, const char **end)
{
	u32 v = 0;
	for (int i = 0; i < 4; i++) {
		u32 o = 0;
		int digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 4) {
			o = o * 10 + (u32)(*s++ - '0');
			digits++;
		}
		if (!digits || o > 255 || (i < 3 && *s++ != '.'))
			return false;
		v = v << 8 | o;
	}
	*ip = v;
	*end = s;
	return true;
}

static void fmt_ip(char *buf, u32 ip)
{
	snprintf(buf, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
}

static void post_rx(u16 i)
{
	net.rx.desc[i] = (struct vring_desc){(u64)(net.rxbuf + (u64)i * BUF), BUF, VRING_DESC_F_WRITE, 0};
	vq_post(&net.rx, i);
}

/* Between the bursts of a printed line: frames that came meanwhile are answered (an echo
 * request, an ARP query) rather than after the line; nothing here prints. */
static void poll_while_printing(void)
{
	if (net.up && vq_pending(&net.rx))
		net_poll();
}

bool net_up(void)
{
	if (net.up)
		return true;
	net.dev = virtio_find(VIRTIO_ID_NET, 0);
	if (!net.dev) {
		say("NET FAILED no network device");
		return false;
	}
	u64 got = 0;
	if (!virtio_start(net.dev, F_MAC | F_STATUS, &got) ||
	    !virtio_queue(net.dev, &net.rx, RXQ, QSIZE) ||
	    !virtio_queue(net.dev, &net.tx, TXQ, QSIZE)) {
		say("NET FAILED device setup");
		return false;
	}
	net.rxbuf = (u8 *)mem_alloc(QSIZE * BUF, 4096);
	net.txbuf = (u8 *)mem_alloc(QSIZE * BUF, 4096);
	if (!net.rxbuf || !net.txbuf) {
		say("NET FAILED out of memory");
		return false;
	}
	for (unsigned i = 0; i < 6; i++)
		net.mac[i] = (got & F_MAC) ? virtio_config8(net.dev, i) : (u8)(0x52 + i);
	for (u16 i = 0; i < QSIZE; i++)
		post_rx(i);
	/* Received frames wake the waiting loops; sent ones are reaped by polling. */
	vq_interrupts(&net.rx, true);
	if (!virtio_driver_ok(net.dev)) {
		say("NET FAILED driver_ok refused");
		return false;
	}
	vq_notify(net.dev, &net.rx);
	net.up = true;
	uart_set_tx_hook(poll_while_printing);
	return true;
}

static void reap_tx(void)
{
	u32 id, len;
	while (vq_take(&net.tx, &id, &len))
		net.tx_done++;
}

/* A frame slot to fill, waiting for the device to hand one back if all are
 * in flight (it completes in order, so slots are reused in order). */
u8 *tx_slot(void)
{
	reap_tx();
	while (net.tx_issued - net.tx_done >= QSIZE) {
		if (!vq_wait(net.dev, &net.tx, rdtsc() + time_us_to_tsc(1000000)))
			return NULL;
		reap_tx();
	}
	u8 *b = net.txbuf + (net.tx_issued % QSIZE) * BUF;
	memset(b, 0, VHDR);
	return b + VHDR;
}

void tx_send(u8 *frame, usize len, bool kick)
{
	u16 i = (u16)(net.tx_issued % QSIZE);
	if (len < 60) { /* pad to the Ethernet minimum */
		memset(frame + len, 0, 60 - len);
		len = 60;
	}
	net.tx.desc[i] = (struct vring_desc){(u64)(frame - VHDR), (u32)(len + VHDR), 0, 0};
	vq_post(&net.tx, i);
	net.tx_issued++;
	net.tx_frames++;
	if (kick)
		vq_notify(net.dev, &net.tx);
}

static void eth(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, net.mac, 6);
	put16(f + 12, type);
}

static void arp_learn(u32 ip, const u8 *mac)
{
	for (unsigned i = 0; i < ARP_SLOTS; i++)
		if (net.arp[i].ip == ip) {
			memcpy(net.arp[i].mac, mac, 6);
			return;
		}
	net.arp[net.arp_next].ip = ip;
	memcpy(net.arp[net.arp_next].mac, mac, 6);
	net.arp_next = (net.arp_next + 1) % ARP_SLOTS;
}

static const u8 *arp_lookup(u32 ip)
{
	for (unsigned i = 0; i < ARP_SLOTS; i++)
		if (net.arp[i].ip == ip && ip)
			return net.arp[i].mac;
	return NULL;
}

static void arp_send(u16 op, const u8 *tha, u32 tpa)
{
	static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	u8 *f = tx_slot();
	if (!f)
		return;
	eth(f, op == 1 ? bcast : tha, ETH_ARP);
	u8 *a = f + 14;
	put16(a, 1);
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, net.mac, 6);
	put32(a + 14, net.ip);
	memcpy(a + 18, op == 1 ? (const u8 *)"\0\0\0\0\0\0" : tha, 6);
	put32(a + 24, tpa);
	tx_send(f, 14 + 28, true);
}

/* An IPv4 header at f+14 for `payload` bytes; returns the payload. */
u8 *ip_header(u8 *f, const u8 *dst_mac, u32 dst, u8 proto, usize payload)
{
	eth(f, dst_mac, ETH_IP);
	u8 *h = f + 14;
	memset(h, 0, 20);
	h[0] = 0x45;
	put16(h + 2, (u16)(20 + payload));
	h[8] = 64;
	h[9] = proto;
	put32(h + 12, net.ip);
	put32(h + 16, dst);
	put16(h + 10, csum(h, 20));
	return h + 20;
}

static void udp_send(const u8 *dst_mac, u32 dst, u16 sport, u16 dport, const u8 *data, usize n, bool kick)
{
	u8 *f = tx_slot();
	if (!f || n > 1400)
		return;
	u8 *u = ip_header(f, dst_mac, dst, IP_UDP, 8 + n);
	put16(u, sport);
	put16(u + 2, dport);
	put16(u + 4, (u16)(8 + n));
	put16(u + 6, 0); /* no checksum (IPv4 allows it) */
	memcpy(u + 8, data, n);
	tx_send(f, 14 + 20 + 8 + n, kick);
}

static void handle_arp(const u8 *f, usize len)
{
	if (len < 14 + 28)
		return;
	const u8 *a = f + 14;
	if (get16(a) != 1 || get16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4)
		return;
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	if (spa)
		arp_learn(spa, a + 8);
	if (get16(a + 6) == 1 && tpa == net.ip)
		arp_send(2, a + 8, spa);
}

/* Read a DHCP reply (`p`, `n` bytes of UDP payload from the network: every
 * offset is checked against `n`) into the exchange state if it answers our xid. */
static void dhcp_input(const u8 *p, usize n)
{
	if (n < DHCP_FIXED || p[0] != 2 || p[1] != 1 || p[2] != 6 || get32(p + 4) != net.xid ||
	    memcmp(p + 28, net.mac, 6) || get32(p + 236) != DHCP_COOKIE)
		return;
	u8 type = 0;
	u32 server = 0, mask = 0, router = 0;
	u16 mtu = 0;
	bool rapid = false;
	for (usize i = DHCP_FIXED; i < n;) {
		u8 code = p[i];
		if (code == 0) { /* pad */
			i++;
			continue;
		}
		if (code == 255)
			break;
		if (i + 1 >= n || i + 2 + (usize)p[i + 1] > n)
			return; /* an option running past the datagram: the whole reply is refused */
		usize len = p[i + 1];
		const u8 *v = p + i + 2;
		if (code == 53 && len == 1)
			type = v[0];
		else if (code == 54 && len == 4)
			server = get32(v);
		else if (code == 1 && len == 4)
			mask = get32(v);
		else if (code == 3 && len >= 4)
			router = get32(v);
		else if (code == 26 && len == 2)
			mtu = get16(v);
		else if (code == 80 && len == 0)
			rapid = true;
		i += 2 + len;
	}
	if (type != 2 && type != 5 && type != 6)
		return;
	net.dhcp_type = type;
	net.dhcp_rapid = rapid;
	net.dhcp_yiaddr = get32(p + 16);
	net.dhcp_server = server;
	net.dhcp_mask = mask;
	net.dhcp_router = router;
	net.dhcp_mtu = mtu;
}

static void ping_input(u16 seq)
{
	if (net.ping_seen[seq / 8] & (1u << (seq % 8))) /* u16: always within PING_MAX */
		return;
	net.ping_seen[seq / 8] |= (u8)(1u << (seq % 8));
	net.ping_got++;
	if (!net.ping_first)
		net.ping_first = (u64)seq + 1;
}


static void handle_ip(const u8 *f, usize len)
{
	if (len < 14 + 20)
		return;
	const u8 *h = f + 14;
	usize ihl = (usize)(h[0] & 15) * 4, total = get16(h + 2);
	if ((h[0] >> 4) != 4 || ihl < 20 || total < ihl || 14 + total > len)
		return;
	u32 dst = get32(h + 16);
	/* Broadcasts and, while it has no address yet, frames for its MAC: a DHCP
	 * server may send the offer to the address it offers. */
	if (dst != net.ip && dst != 0xffffffffu && !(net.xid && memcmp(f, net.mac, 6) == 0))
		return;
	if (get16(h + 6) & 0x3fff)
		return; /* fragments: not for this guest */
	u32 src = get32(h + 12);
	const u8 *p = h + ihl;
	usize plen = total - ihl;
	const u8 *src_mac = f + 6;
	if (h[9] == IP_ICMP && plen >= 8 && p[0] == 0 && get16(p + 4) == PING_ID) {
		ping_input(get16(p + 6));
	} else if (dst != net.ip) {
		if (h[9] == IP_UDP && plen >= 8 && get16(p + 2) == DHCP_CLIENT && get16(p + 4) >= 8 &&
		    get16(p + 4) <= plen)
			dhcp_input(p + 8, get16(p + 4) - 8u);
	} else if (h[9] == IP_ICMP && plen >= 8 && p[0] == 8 && plen <= 1400) {
		u8 *r = tx_slot();
		if (!r)
			return;
		u8 *icmp = ip_header(r, src_mac, src, IP_ICMP, plen);
		memcpy(icmp, p, plen);
		icmp[0] = 0; /* echo reply */
		put16(icmp + 2, 0);
		put16(icmp + 2, csum(icmp, plen));
		tx_send(r, 14 + 20 + plen, true);
	} else if (h[9] == IP_TCP) {
		tcp_input(src_mac, src, p, plen);
	} else if (h[9] == IP_UDP && plen >= 8) {
		u16 sport = get16(p), dport = get16(p + 2), ulen = get16(p + 4);
		if (ulen < 8 || ulen > plen)
			return;
		if (dport == ECHO_PORT) {
			udp_send(src_mac, src, ECHO_PORT, sport, p + 8, ulen - 8u, true);
		} else if (dport == CLIENT_PORT) {
			usize n = ulen - 8u < 64 ? ulen - 8u : 64;
			for (usize i = 0; i < n; i++) {
				u8 c = p[8 + i];
				net.reply_data[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '.';
			}
			net.reply_data[n] = 0;
			net.reply_ip = src;
			net.reply_port = sport;
			net.reply = true;
		}
	}
}

static unsigned net_poll_rings(void);

/* Held while a CPU polls: a line printed from inside the poll (a fault's report) or by an
 * AP meanwhile must not walk the rings a second time (poll_while_printing). */
static bool polling;

unsigned net_poll(void)
{
	if (!net.up || __atomic_exchange_n(&polling, true, __ATOMIC_ACQUIRE))
		return 0;
	unsigned n = net_poll_rings();
	__atomic_store_n(&polling, false, __ATOMIC_RELEASE);
	return n;
}

static unsigned net_poll_rings(void)
{
	unsigned n = 0;
	u32 id, len;
	virtio_ack(net.dev);
	while (n < QSIZE && vq_take(&net.rx, &id, &len)) {
		if (id < QSIZE && len > VHDR && len <= BUF) {
			const u8 *f = net.rxbuf + (u64)id * BUF + VHDR;
			usize flen = len - VHDR;
			if (flen >= 14) {
				u16 type = get16(f + 12);
				if (type == ETH_ARP)
					handle_arp(f, flen);
				else if (type == ETH_IP)
					handle_ip(f, flen);
			}
			net.rx_frames++;
		}
		if (id < QSIZE)
			post_rx((u16)id);
		n++;
	}
	if (n)
		vq_notify(net.dev, &net.rx);
	tcp_flush(); /* one ACK for the whole batch */
	reap_tx();
	return n;
}

/* Serve until `done()` or the deadline; false on timeout. */
bool serve_until(bool (*done)(u32), u32 arg, u64 deadline)
{
	for (;;) {
		net_poll();
		if (done(arg))
			return true;
		if (rdtsc() >= deadline)
			return false;
		wait_until(deadline);
	}
}

static bool have_arp(u32 ip) { return arp_lookup(ip) != NULL; }
static bool have_reply(u32 unused) { (void)unused; return net.reply; }

const u8 *resolve(u32 ip)
{
	for (int tries = 0; tries < 15 && !arp_lookup(ip); tries++) {
		arp_send(1, NULL, ip);
		serve_until(have_arp, ip, rdtsc() + time_us_to_tsc(200000));
	}
	return arp_lookup(ip);
}

/* The link-layer next hop for `ip`: itself on the subnet, else the router. */
u32 next_hop(u32 ip)
{
	if (net.mask && net.router && (ip & net.mask) != (net.ip & net.mask))
		return net.router;
	return ip;
}

static unsigned prefix_len(u32 mask)
{
	unsigned n = 0;
	while (n < 32 && (mask & (0x80000000u >> n)))
		n++;
	return n;
}

static void dhcp_send(u8 type, u32 requested, u32 server)
{
	static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	u8 m[DHCP_FIXED + 32];
	memset(m, 0, sizeof(m));
	m[0] = 1; /* BOOTREQUEST */
	m[1] = 1; /* Ethernet */
	m[2] = 6;
	put32(m + 4, net.xid);
	put16(m + 10, 0x8000); /* broadcast the reply: no address to receive it on yet */
	memcpy(m + 28, net.mac, 6);
	put32(m + 236, DHCP_COOKIE);
	usize i = DHCP_FIXED;
	m[i++] = 53, m[i++] = 1, m[i++] = type;
	m[i++] = 55, m[i++] = 3, m[i++] = 1, m[i++] = 3, m[i++] = 26; /* mask, router, MTU */
	if (type == 1)
		m[i++] = 80, m[i++] = 0; /* Rapid Commit: a server that does it ACKs at once */
	if (requested) {
		m[i++] = 50, m[i++] = 4;
		put32(m + i, requested);
		i += 4;
	}
	if (server) {
		m[i++] = 54, m[i++] = 4;
		put32(m + i, server);
		i += 4;
	}
	m[i++] = 255;
	u32 own = net.ip;
	net.ip = 0; /* from 0.0.0.0, as RFC 2131 asks of a client without a lease */
	udp_send(bcast, 0xffffffffu, DHCP_CLIENT, DHCP_SERVER, m, i, true);
	net.ip = own;
}

static bool have_dhcp(u32 want) { return net.dhcp_type == want || net.dhcp_type == 6; }

/* An answer to a DISCOVER: an OFFER, a NAK, or an ACK with Rapid Commit (RFC 4039; an ACK
 * without it is ignored there, as the RFC asks: an OFFER after it is still taken). */
static bool have_offer(u32 unused)
{
	(void)unused;
	return net.dhcp_type == 2 || net.dhcp_type == 6 || (net.dhcp_type == 5 && net.dhcp_rapid);
}

/* DISCOVER, then OFFER, REQUEST, ACK or (Rapid Commit) the ACK at once, each step retried;
 * false if no lease came. */
static bool dhcp_lease(void)
{
	net.xid = (u32)rdtsc() ^ get32(net.mac + 2);
	for (int round = 0; round < 4; round++) {
		net.dhcp_type = 0;
		bool offered = false;
		for (int tries = 0; tries < 20 && !offered; tries++) {
			dhcp_send(1, 0, 0); /* DISCOVER */
			offered = serve_until(have_offer, 0, rdtsc() + time_us_to_tsc(tries < 5 ? 20000 : 250000)) &&
			          net.dhcp_type != 6;
		}
		if (!offered)
			return false;
		if (net.dhcp_type == 5)
			return true; /* the server committed at once: the lease is ours */
		u32 offer = net.dhcp_yiaddr, server = net.dhcp_server;
		for (int tries = 0; tries < 10; tries++) {
			net.dhcp_type = 0;
			dhcp_send(3, offer, server); /* REQUEST */
			if (!serve_until(have_dhcp, 5, rdtsc() + time_us_to_tsc(tries < 3 ? 50000 : 500000)))
				continue;
			if (net.dhcp_type == 5 && net.dhcp_yiaddr == offer)
				return true;
			break; /* a NAK: start over */
		}
	}
	return false;
}

void net_start(const char *arg)
{
	const char *end;
	u32 v = 0;
	bool dhcp = strcmp(arg, "dhcp") == 0;
	if (!dhcp && (!parse_ip(arg, &v, &end) || *end)) {
		say("unknown action value %s", arg);
		return;
	}
	net.ip = v;
	if (!net_up())
		return;
	char buf[16];
	if (dhcp) {
		if (!dhcp_lease()) {
			net.xid = 0;
			say("DHCP FAILED no lease");
			return;
		}
		net.xid = 0;
		net.ip = net.dhcp_yiaddr;
		net.mask = net.dhcp_mask;
		net.router = net.dhcp_router;
		net.mtu = net.dhcp_mtu;
		char router[16], server[16];
		fmt_ip(buf, net.ip);
		fmt_ip(router, net.router);
		fmt_ip(server, net.dhcp_server);
		say("DHCP lease ip=%s/%u router=%s mtu=%u server=%s", buf, prefix_len(net.mask), router,
		    (unsigned)net.mtu, server);
	}
	fmt_ip(buf, net.ip);
	say("NET up mac=%02x:%02x:%02x:%02x:%02x:%02x ip=%s", net.mac[0], net.mac[1], net.mac[2],
	    net.mac[3], net.mac[4], net.mac[5], buf);
}

/* gw=<a.b.c.d>: send off-subnet traffic through this router (a /24 when no
 * lease gave a prefix), whatever DHCP said. */
void net_gateway(const char *arg)
{
	const char *end;
	u32 v;
	if (!parse_ip(arg, &v, &end) || *end) {
		say("unknown action value %s", arg);
		return;
	}
	net.router = v;
	if (!net.mask)
		net.mask = 0xffffff00u;
	say("NET gateway %s", arg);
}

static void ping_send(u32 dst, const u8 *mac, u16 seq)
{
	u8 *f = tx_slot();
	if (!f)
		return;
	u8 *icmp = ip_header(f, mac, dst, IP_ICMP, 8 + 32);
	icmp[0] = 8;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, PING_ID);
	put16(icmp + 6, seq);
	memset(icmp + 8, 'p', 32);
	put16(icmp + 2, csum(icmp, 8 + 32));
	tx_send(f, 14 + 20 + 8 + 32, true);
}

static bool no_more(u32 unused) { (void)unused; return false; }

/* ping=<a.b.c.d>,<count>,<interval ms>: echo requests at that interval; says
 * when the first reply came and, at the end, how many were lost. */
void net_ping(const char *args)
{
	u32 ip;
	u64 count, interval;
	const char *p;
	char num[24];
	if (!parse_ip(args, &ip, &p) || *p++ != ',') {
		say("unknown action value %s", args);
		return;
	}
	usize n = 0;
	while (p[n] >= '0' && p[n] <= '9' && n < 20)
		n++;
	memcpy(num, p, n);
	num[n] = 0;
	if (p[n] != ',' || !parse_u64(num, &count) || !count || count > PING_MAX ||
	    !parse_u64(p + n + 1, &interval) || interval > 60000) {
		say("unknown action value %s", args);
		return;
	}
	if (!net_up())
		return;
	if (!net.ip) {
		say("PING FAILED no address (give net=<ip> or net=dhcp first)");
		return;
	}
	char to[16];
	fmt_ip(to, ip);
	memset(net.ping_seen, 0, sizeof(net.ping_seen));
	net.ping_got = net.ping_first = 0;
	bool first_said = false;
	u64 step = time_us_to_tsc(interval * 1000), next = rdtsc();
	for (u64 seq = 0; seq < count; seq++) {
		/* Resolved every time: an ARP answer that was lost is asked again. */
		const u8 *mac = arp_lookup(next_hop(ip));
		if (!mac) {
			arp_send(1, NULL, next_hop(ip));
			serve_until(have_arp, next_hop(ip), rdtsc() + (step < time_us_to_tsc(1000) ? time_us_to_tsc(1000) : step));
			mac = arp_lookup(next_hop(ip));
		}
		if (mac)
			ping_send(ip, mac, (u16)seq);
		next += step;
		serve_until(no_more, 0, next);
		if (net.ping_first && !first_said) {
			say("PING first reply from=%s seq=%lu", to, net.ping_first - 1);
			first_said = true;
		}
	}
	serve_until(no_more, 0, rdtsc() + time_us_to_tsc(1000000));
	say("PING to=%s sent=%lu received=%lu lost=%lu", to, count, net.ping_got, count - net.ping_got);
}

bool parse_dest(const char *s, u32 *ip, u64 *port, const char **end)
{
	const char *p;
	if (!parse_ip(s, ip, &p) || *p != ':')
		return false;
	p++;
	char buf[8];
	usize n = 0;
	while (p[n] >= '0' && p[n] <= '9' && n < 6)
		n++;
	memcpy(buf, p, n);
	buf[n] = 0;
	*end = p + n;
	return n && parse_u64(buf, port) && *port && *port < 65536;
}

void net_udp(const char *dest)
{
	u32 ip;
	u64 port;
	const char *end;
	if (!parse_dest(dest, &ip, &port, &end) || *end) {
		say("unknown action value %s", dest);
		return;
	}
	if (!net_up())
		return;
	if (!net.ip) {
		say("UDP FAILED no address (give net=<ip> first)");
		return;
	}
	const u8 *mac = resolve(next_hop(ip));
	if (!mac) {
		say("UDP FAILED no ARP answer from %s", dest);
		return;
	}
	char msg[48];
	usize n = snprintf(msg, sizeof(msg), "flotilla-udp %lu", rdtsc() & 0xffffff);
	net.reply = false;
	udp_send(mac, ip, CLIENT_PORT, (u16)port, (const u8 *)msg, n, true);
	if (!serve_until(have_reply, 0, rdtsc() + time_us_to_tsc(5000000))) {
		say("UDP FAILED timeout from %s", dest);
		return;
	}
	char from[16];
	fmt_ip(from, net.reply_ip);
	say("UDP reply from=%s:%u sent=%s data=%s", from, net.reply_port, msg, net.reply_data);
}

void net_bench(const char *args)
{
	u32 ip;
	u64 port, count;
	const char *end;
	if (!parse_dest(args, &ip, &port, &end) || *end != ',' || !parse_u64(end + 1, &count) || !count) {
		say("unknown action value %s", args);
		return;
	}
	if (!net_up())
		return;
	const u8 *mac = resolve(ip);
	if (!mac) {
		say("NETBENCH FAILED no ARP answer");
		return;
	}
	u8 payload[64];
	memset(payload, 'x', sizeof(payload));
	u64 t0 = rdtsc();
	for (u64 i = 0; i < count; i++) {
		/* One notify per 16 frames: the device drains the ring as it goes. */
		udp_send(mac, ip, CLIENT_PORT, (u16)port, payload, sizeof(payload), (i & 15) == 15);
	}
	vq_notify(net.dev, &net.tx);
	while (net.tx_done < net.tx_issued) {
		if (!vq_wait(net.dev, &net.tx, rdtsc() + time_us_to_tsc(2000000)))
			break;
		reap_tx();
	}
	u64 ns = (rdtsc() - t0) * 1000 / (time_tsc_hz() / 1000000);
	say("NETBENCH packets=%lu bytes=%lu ns=%lu", count, count * sizeof(payload), ns);
}

u32 net_ip(void) { return net.ip; }
u16 net_mtu(void) { return net.mtu; }
void net_tx_kick(void) { vq_notify(net.dev, &net.tx); }
