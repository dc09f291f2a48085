/* The test guest's TCP (below), on net.c's frames and waiting loop. */
#include "net.h"
#include "net_internal.h"
#include "io.h"
#include "lib.h"
#include "print.h"
#include "time.h"

/*
 * TCP, one connection at a time, for throughput between guests: `tcpsink=<port>` takes one
 * connection and checks every byte of it, `tcpsend=<a.b.c.d>:<port>,<bytes>` sends that
 * many. Enough of RFC 793 for a bulk transfer on a LAN: the three-way handshake with the
 * MSS option, cumulative ACKs (one per batch of frames received), a fixed 64 KiB window,
 * go-back-N on two duplicate ACKs (one comes per batch) or 50 ms without progress, FIN both
 * ways. Segments
 * carry a pattern of their stream offset (tcp_byte) and are checksummed both ways.
 */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_WINDOW 65535u
#define TCP_RTO_US 50000
#define TCP_GIVE_UP_US 10000000

enum { TCP_CLOSED, TCP_LISTEN, TCP_SYN_SENT, TCP_SYN_RCVD, TCP_OPEN, TCP_DONE };

static struct {
	int state;
	u16 lport, rport;
	u32 rip;
	u8 rmac[6];
	u32 iss, snd_una, snd_nxt, snd_max, snd_wnd, dupacks;
	u32 irs, rcv_nxt;
	u16 mss;
	bool ack_due, fin_got;
	u64 received, bad, dropped, retransmits;
	u64 t_first, t_last;
} tcp;

static bool seq_lt(u32 a, u32 b) { return (s32)(a - b) < 0; }
static bool seq_le(u32 a, u32 b) { return (s32)(a - b) <= 0; }

/* The byte at stream offset `k`: a receiver can check every byte it is given. */
static u8 tcp_byte(u64 k) { return (u8)(k ^ (k >> 8) ^ (k >> 16) ^ 0x5a); }

static u32 sum16(u32 s, const u8 *p, usize n)
{
	for (usize i = 0; i + 1 < n; i += 2)
		s += get16(p + i);
	if (n & 1)
		s += (u32)p[n - 1] << 8;
	return s;
}

/* The TCP checksum of `n` bytes of segment at `p` between `src` and `dst`. */
static u16 tcp_csum(u32 src, u32 dst, const u8 *p, usize n)
{
	u64 s = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + IP_TCP + n;
	s += sum16(0, p, n);
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

static u16 tcp_mss(void)
{
	u16 mtu = net_mtu() ? net_mtu() : 1500;
	u16 mss = (u16)(mtu - 40);
	return mss > BUF - VHDR - 14 - 40 ? (u16)(BUF - VHDR - 14 - 40) : mss;
}

/* One segment: `len` payload bytes from stream offset `off` (none for len 0). */
static bool tcp_send(u8 flags, u32 seq, u64 off, usize len, bool kick)
{
	u8 *f = tx_slot();
	if (!f)
		return false;
	usize hlen = flags & TCP_SYN ? 24 : 20;
	u8 *t = ip_header(f, tcp.rmac, tcp.rip, IP_TCP, hlen + len);
	put16(t, tcp.lport);
	put16(t + 2, tcp.rport);
	put32(t + 4, seq);
	put32(t + 8, flags & TCP_ACK ? tcp.rcv_nxt : 0);
	t[12] = (u8)(hlen / 4) << 4;
	t[13] = flags;
	put16(t + 14, (u16)TCP_WINDOW);
	put16(t + 16, 0);
	put16(t + 18, 0);
	if (flags & TCP_SYN) {
		t[20] = 2, t[21] = 4; /* MSS */
		put16(t + 22, tcp_mss());
	}
	for (usize i = 0; i < len; i++)
		t[hlen + i] = tcp_byte(off + i);
	put16(t + 16, tcp_csum(net_ip(), tcp.rip, t, hlen + len));
	tx_send(f, 14 + 20 + hlen + len, kick);
	return true;
}

void tcp_flush(void)
{
	if (tcp.ack_due && tcp.state >= TCP_SYN_RCVD) {
		tcp.ack_due = false;
		tcp_send(TCP_ACK, tcp.snd_nxt, 0, 0, true);
	}
}

/* A segment (`n` bytes at `p`, IP payload) from `src`: every length checked against `n`. */
void tcp_input(const u8 *src_mac, u32 src, const u8 *p, usize n)
{
	if (n < 20 || tcp.state == TCP_CLOSED)
		return;
	usize hlen = (usize)(p[12] >> 4) * 4;
	if (hlen < 20 || hlen > n || tcp_csum(src, net_ip(), p, n) != 0)
		return; /* short, or damaged: as if lost */
	u16 sport = get16(p), dport = get16(p + 2);
	u32 seq = get32(p + 4), ack = get32(p + 8);
	u8 flags = p[13];
	u16 win = get16(p + 14);
	const u8 *data = p + hlen;
	usize len = n - hlen;
	if (dport != tcp.lport || (flags & TCP_RST))
		return;
	if (tcp.state == TCP_LISTEN) {
		if (!(flags & TCP_SYN) || (flags & TCP_ACK))
			return;
		tcp.rip = src, tcp.rport = sport;
		memcpy(tcp.rmac, src_mac, 6);
		tcp.irs = seq, tcp.rcv_nxt = seq + 1;
		tcp.iss = (u32)rdtsc();
		tcp.snd_una = tcp.iss, tcp.snd_nxt = tcp.snd_max = tcp.iss + 1;
		tcp.state = TCP_SYN_RCVD;
		tcp_send(TCP_SYN | TCP_ACK, tcp.iss, 0, 0, true);
		return;
	}
	if (src != tcp.rip || sport != tcp.rport)
		return;
	if (tcp.state == TCP_SYN_SENT) {
		if ((flags & (TCP_SYN | TCP_ACK)) != (TCP_SYN | TCP_ACK) || ack != tcp.iss + 1)
			return;
		tcp.irs = seq, tcp.rcv_nxt = seq + 1;
		tcp.snd_una = ack, tcp.snd_wnd = win;
		for (usize i = 20; i + 4 <= hlen;) { /* the peer's MSS, if it says */
			if (p[i] == 0)
				break;
			if (p[i] == 1) {
				i++;
				continue;
			}
			if (p[i + 1] < 2 || i + p[i + 1] > hlen)
				break;
			if (p[i] == 2 && p[i + 1] == 4 && get16(p + i + 2) < tcp.mss)
				tcp.mss = get16(p + i + 2);
			i += p[i + 1];
		}
		tcp.state = TCP_OPEN;
		tcp.ack_due = true;
		return;
	}
	if (flags & TCP_SYN) { /* our SYN-ACK was lost: say it again */
		if (tcp.state == TCP_SYN_RCVD)
			tcp_send(TCP_SYN | TCP_ACK, tcp.iss, 0, 0, true);
		return;
	}
	if (flags & TCP_ACK) {
		if (tcp.state == TCP_SYN_RCVD && ack == tcp.iss + 1)
			tcp.state = TCP_OPEN;
		if (seq_lt(tcp.snd_una, ack) && seq_le(ack, tcp.snd_max)) {
			tcp.snd_una = ack;
			tcp.dupacks = 0;
			if (seq_lt(tcp.snd_nxt, ack))
				tcp.snd_nxt = ack;
		} else if (ack == tcp.snd_una && !len && !(flags & TCP_FIN) && tcp.snd_una != tcp.snd_max) {
			tcp.dupacks++;
		}
		tcp.snd_wnd = win;
	}
	if (len || (flags & TCP_FIN)) {
		tcp.ack_due = true;
		if (seq != tcp.rcv_nxt) {
			tcp.dropped++; /* out of order or again: the ACK says what is missing */
			return;
		}
		u64 off = (u32)(seq - tcp.irs - 1); /* tcpsend sends less than 4 GiB */
		for (usize i = 0; i < len; i++)
			if (data[i] != tcp_byte(off + i))
				tcp.bad++;
		if (!tcp.t_first && len)
			tcp.t_first = rdtsc();
		tcp.received += len;
		tcp.rcv_nxt += (u32)len;
		tcp.t_last = rdtsc();
		if (flags & TCP_FIN) {
			tcp.rcv_nxt++;
			tcp.fin_got = true;
		}
	}
}

static bool tcp_ended(u32 unused) { (void)unused; return tcp.fin_got; }
static bool tcp_opened(u32 unused) { (void)unused; return tcp.state == TCP_OPEN; }

static u64 tsc_ns(u64 ticks) { return ticks * 1000 / (time_tsc_hz() / 1000000); }

/* tcpsink=<port>: take one connection on <port> and read it to its FIN (60 s at most). */
void net_tcp_sink(const char *arg)
{
	u64 port;
	if (!parse_u64(arg, &port) || !port || port > 65535) {
		say("unknown action value %s", arg);
		return;
	}
	if (!net_up())
		return;
	memset(&tcp, 0, sizeof(tcp));
	tcp.lport = (u16)port;
	tcp.mss = tcp_mss();
	tcp.state = TCP_LISTEN;
	say("TCP listening port=%lu", port);
	bool ended = serve_until(tcp_ended, 0, rdtsc() + time_us_to_tsc(60000000));
	if (ended) {
		tcp.snd_nxt = tcp.snd_max = tcp.snd_una;
		tcp_send(TCP_FIN | TCP_ACK, tcp.snd_nxt, 0, 0, true);
	}
	say("TCP received bytes=%lu bad=%lu ns=%lu out_of_order=%lu%s", tcp.received, tcp.bad,
	    tsc_ns(tcp.t_last - tcp.t_first), tcp.dropped, ended ? "" : " (no FIN: timed out)");
	tcp.state = TCP_CLOSED;
}

/* tcpsend=<a.b.c.d>:<port>,<bytes>: connect, send <bytes> of the pattern, close. */
void net_tcp_send(const char *args)
{
	u32 ip;
	u64 port, bytes;
	const char *end;
	if (!parse_dest(args, &ip, &port, &end) || *end != ',' || !parse_u64(end + 1, &bytes) ||
	    !bytes || bytes > 0xffff0000UL) {
		say("unknown action value %s", args);
		return;
	}
	if (!net_up())
		return;
	const u8 *mac = net_ip() ? resolve(next_hop(ip)) : NULL;
	if (!mac) {
		say("TCP FAILED no address or no ARP answer for %s", args);
		return;
	}
	memset(&tcp, 0, sizeof(tcp));
	memcpy(tcp.rmac, mac, 6);
	tcp.rip = ip, tcp.rport = (u16)port;
	tcp.lport = (u16)(41000 + (rdtsc() & 0xfff));
	tcp.mss = tcp_mss();
	tcp.iss = (u32)rdtsc();
	tcp.snd_una = tcp.iss, tcp.snd_nxt = tcp.snd_max = tcp.iss + 1;
	tcp.state = TCP_SYN_SENT;
	for (int tries = 0; tries < 10 && tcp.state != TCP_OPEN; tries++) {
		tcp_send(TCP_SYN, tcp.iss, 0, 0, true);
		serve_until(tcp_opened, 0, rdtsc() + time_us_to_tsc(TCP_RTO_US));
	}
	if (tcp.state != TCP_OPEN) {
		say("TCP FAILED no answer to SYN from %s", args);
		tcp.state = TCP_CLOSED;
		return;
	}
	tcp_flush();
	u32 first = tcp.iss + 1, last = first + (u32)bytes; /* FIN's sequence number */
	u64 t0 = rdtsc(), progress_at = t0;
	u32 seen_una = tcp.snd_una;
	bool fin_sent = false;
	while (seq_lt(tcp.snd_una, last + 1)) {
		u64 now = rdtsc();
		if (tcp.snd_una != seen_una) {
			seen_una = tcp.snd_una;
			progress_at = now;
		} else if (now - progress_at > time_us_to_tsc(TCP_GIVE_UP_US)) {
			break;
		}
		if (tcp.dupacks >= 2 || now - progress_at > time_us_to_tsc(TCP_RTO_US)) {
			tcp.snd_nxt = tcp.snd_una; /* go back to what the peer lacks */
			tcp.dupacks = 0;
			tcp.retransmits++;
			progress_at = now;
			fin_sent = false;
		}
		unsigned burst = 0;
		while (seq_lt(tcp.snd_nxt, last) && burst < QSIZE / 2) {
			u32 len = last - tcp.snd_nxt < tcp.mss ? last - tcp.snd_nxt : tcp.mss;
			if ((u32)(tcp.snd_nxt - tcp.snd_una) + len > tcp.snd_wnd)
				break;
			if (!tcp_send(TCP_ACK | TCP_PSH, tcp.snd_nxt, (u32)(tcp.snd_nxt - first), len,
				      (++burst & 7) == 0))
				break;
			tcp.snd_nxt += len;
			if (seq_lt(tcp.snd_max, tcp.snd_nxt))
				tcp.snd_max = tcp.snd_nxt;
		}
		if (tcp.snd_nxt == last && !fin_sent) {
			tcp_send(TCP_FIN | TCP_ACK, last, 0, 0, false);
			tcp.snd_nxt = tcp.snd_max = last + 1;
			fin_sent = true;
			burst++;
		}
		if (burst & 7) /* what the last kick in the loop did not cover */
			net_tx_kick();
		net_poll(); /* the ACKs: polled, not waited for (a wake-up costs more than a turn) */
	}
	u64 ns = tsc_ns(rdtsc() - t0);
	bool done = tcp.snd_una == last + 1;
	serve_until(tcp_ended, 0, rdtsc() + time_us_to_tsc(done ? 1000000 : 1));
	u64 mbps = ns ? bytes * 8 * 1000 / ns : 0;
	say("TCP %s bytes=%lu ns=%lu mbps=%lu retransmits=%lu mss=%u", done ? "sent" : "FAILED",
	    done ? bytes : (u64)(u32)(tcp.snd_una - first), ns, mbps, tcp.retransmits,
	    (unsigned)tcp.mss);
	tcp.state = TCP_CLOSED;
}
