/* The `net*` and `udp` actions on the first virtio-net device: ARP, ICMP
 * echo and a UDP echo service on port 7 for the address given, answered
 * from the waiting loops (docs/machine.md). */
#ifndef GUEST_NET_H
#define GUEST_NET_H

#include "types.h"

void net_start(const char *ip);    /* net=<a.b.c.d> | net=dhcp */
void net_ping(const char *args);
void net_gateway(const char *ip);  /* gw=<a.b.c.d> */   /* ping=<a.b.c.d>,<count>,<interval ms> */
void net_udp(const char *dest);    /* udp=<a.b.c.d>:<port> */
void net_bench(const char *args);  /* netbench=<a.b.c.d>:<port>,<count> */
void net_tcp_sink(const char *port);   /* tcpsink=<port> */
void net_tcp_send(const char *args);   /* tcpsend=<a.b.c.d>:<port>,<bytes> */
/* Serve what came in; returns the frames taken (0 when the NIC is down). */
unsigned net_poll(void);

#endif
