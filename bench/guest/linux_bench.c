/* The in-guest workloads of bench/linux.py, built static and run by Linux in the guest.
 *
 *   linux_bench randread DEVICE OPS       OPS 4 KiB O_DIRECT preads at random aligned offsets,
 *                                         one in flight (fio's psync shape); prints
 *                                         "RANDREAD ops=N ns=T"
 *   linux_bench tcpsend ADDR PORT MIB     connects and sends MIB MiB; prints "TCPSEND bytes=N ns=T"
 *
 * Times are the guest's CLOCK_MONOTONIC; bench/linux.py compares VMMs in one L1 run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define BLOCK 4096

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int randread(const char *dev, long ops)
{
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(dev);
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < BLOCK) {
        fprintf(stderr, "%s: no size\n", dev);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, BLOCK, BLOCK) != 0)
        return 1;
    uint64_t blocks = size / BLOCK, seed = 0x9e3779b97f4a7c15u;
    uint64_t start = now_ns();
    for (long i = 0; i < ops; i++) {
        off_t at = (off_t)(xorshift(&seed) % blocks) * BLOCK;
        if (pread(fd, buf, BLOCK, at) != BLOCK) {
            perror("pread");
            return 1;
        }
    }
    printf("RANDREAD ops=%ld ns=%llu\n", ops, (unsigned long long)(now_ns() - start));
    return 0;
}

static int tcpsend(const char *addr, int port, long mib)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", addr);
        return 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("connect");
        return 1;
    }
    static char chunk[1 << 16];
    memset(chunk, 'f', sizeof(chunk));
    uint64_t total = (uint64_t)mib << 20, sent = 0, start = now_ns();
    while (sent < total) {
        ssize_t n = write(fd, chunk, sizeof(chunk));
        if (n <= 0) {
            perror("write");
            return 1;
        }
        sent += (uint64_t)n;
    }
    shutdown(fd, SHUT_WR);
    char ack;
    if (read(fd, &ack, 1) != 1) /* the receiver answers once it has every byte */
        fprintf(stderr, "no acknowledgement\n");
    printf("TCPSEND bytes=%llu ns=%llu\n", (unsigned long long)sent,
           (unsigned long long)(now_ns() - start));
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "randread") == 0)
        return randread(argv[2], atol(argv[3]));
    if (argc == 5 && strcmp(argv[1], "tcpsend") == 0)
        return tcpsend(argv[2], atoi(argv[3]), atol(argv[4]));
    fprintf(stderr, "usage: linux_bench randread DEV OPS | tcpsend ADDR PORT MIB\n");
    return 2;
}
