/*
 * Host floors for bench/virtio.py: what the host does without a guest in between.
 *   virtio_floor randread FILE OPS      4 KiB preads at random aligned offsets (one thread,
 *                                       like fio --ioengine=psync --bs=4k --rw=randread)
 *   virtio_floor seqread FILE MIB       128 KiB preads front to back (like dd bs=128k)
 *   virtio_floor tapwrite FD HEXFRAME N the same frame written N times to a tap fd
 * Prints "<ops> <ns>".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
	static char buf[128 * 1024] __attribute__((aligned(4096)));
	uint64_t ops = 0, t0;

	if (argc < 4)
		return 2;
	if (!strcmp(argv[1], "tapwrite")) {
		int fd = atoi(argv[2]);
		size_t len = strlen(argv[3]) / 2;
		uint64_t n = strtoull(argv[4], NULL, 10);
		for (size_t i = 0; i < len; i++)
			sscanf(argv[3] + 2 * i, "%2hhx", (unsigned char *)&buf[i]);
		t0 = now_ns();
		for (ops = 0; ops < n; ops++)
			if (write(fd, buf, len) < 0)
				return 1;
	} else {
		int fd = open(argv[2], O_RDONLY);
		off_t size = fd >= 0 ? lseek(fd, 0, SEEK_END) : 0;
		uint64_t n = strtoull(argv[3], NULL, 10), x = 0x2545f4914f6cdd1dULL;
		if (fd < 0 || size < (off_t)sizeof(buf))
			return 1;
		t0 = now_ns();
		if (!strcmp(argv[1], "randread")) {
			uint64_t blocks = (uint64_t)size / 4096;
			for (ops = 0; ops < n; ops++) {
				x ^= x << 13, x ^= x >> 7, x ^= x << 17;
				if (pread(fd, buf, 4096, (off_t)((x % blocks) * 4096)) != 4096)
					return 1;
			}
		} else {
			uint64_t chunks = n * 8, span = (uint64_t)size / sizeof(buf);
			for (ops = 0; ops < chunks; ops++)
				if (pread(fd, buf, sizeof(buf), (off_t)((ops % span) * sizeof(buf))) !=
				    (ssize_t)sizeof(buf))
					return 1;
		}
	}
	printf("%llu %llu\n", (unsigned long long)ops, (unsigned long long)(now_ns() - t0));
	return 0;
}
