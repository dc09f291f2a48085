/*
 * flotilla-vmm: the native runtime with no interpreter in front of it, for a guest on this
 * terminal (what `python -m native.run` does, minus --restore): built from the same sources
 * as the Python module (native/vmm_binary.py builds it), driven through the same public
 * calls (include/flotilla.h). Where a Python start is the larger part of a boot (an emulated
 * host: ~1.2 s of a Linux boot's 4 s in the nested L1, docs/benchmarks.md), this is the
 * runtime's own start.
 *
 *     flotilla-vmm --kernel PATH [--initrd PATH] [--cmdline TEXT] [--memory MiB]
 *                  [--vcpus N] [--memfd] [--disk PATH[,ro]]... [--tap NAME]...
 *
 * Exit status as native.run's: POWEROFF through ACPI 0, through the debug-exit port its
 * status, REBOOT 2, CRASHED 4, INTERNAL_ERROR 6, stopped from the host (Ctrl-] on a
 * terminal, SIGINT, SIGTERM) 130, a bad command line or configuration 64. SIGUSR1 prints the
 * vCPUs and the devices' interrupt state (fl_vm_describe_vcpus, fl_vm_describe) to stderr;
 * the guest runs on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "include/flotilla.h"

enum {
	EXIT_REBOOT = 2,
	EXIT_CRASHED = 4,
	EXIT_INTERNAL_ERROR = 6,
	EXIT_STOPPED = 130,
	EXIT_USAGE = 64,
};

#define ESCAPE 0x1d /* Ctrl-] */

static volatile sig_atomic_t stop_asked, dump_asked;

static void on_stop(int sig)
{
	(void)sig;
	stop_asked = 1;
}

static void on_dump(int sig)
{
	(void)sig;
	dump_asked = 1;
}

static int usage(const char *fmt, const char *arg)
{
	fprintf(stderr, "flotilla-vmm: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, " (see the head of native/cmd/flotilla-vmm.c)\n");
	return EXIT_USAGE;
}

static int parse_uint(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!*s || *s == '-')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v == 0 || v > max)
		return -1;
	*out = v;
	return 0;
}

static int open_tap(const char *name)
{
	struct ifreq ifr;
	int fd;

	if (strlen(name) >= IFNAMSIZ)
		return -ENAMETOOLONG;
	fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	memset(&ifr, 0, sizeof(ifr));
	/* A virtio-net header on every frame: checksum offload and TSO (native/virtio/net.c). */
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	memcpy(ifr.ifr_name, name, strlen(name));
	if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
		int err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/* Terminal input to the guest until Ctrl-]; only when stdin is a terminal. */
struct relay {
	int write_fd;
};

static void *relay_main(void *arg)
{
	struct relay *r = arg;
	char buf[1024];

	for (;;) {
		ssize_t n = read(0, buf, sizeof(buf));
		if (n <= 0)
			return NULL;
		char *esc = memchr(buf, ESCAPE, (size_t)n);
		ssize_t keep = esc ? esc - buf : n;
		if (keep > 0 && write(r->write_fd, buf, (size_t)keep) < 0)
			return NULL;
		if (esc) {
			stop_asked = 1;
			return NULL;
		}
	}
}

/* Seconds on the monotonic clock, for the timings in the summary line. */
static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int exit_status(const struct fl_event *ev)
{
	switch (ev->kind) {
	case FL_EVENT_POWEROFF:
		return (int)(ev->code & 0xff);
	case FL_EVENT_REBOOT:
		return EXIT_REBOOT;
	case FL_EVENT_CRASHED:
		return EXIT_CRASHED;
	default:
		return EXIT_INTERNAL_ERROR;
	}
}

static const char *kind_name(uint32_t kind)
{
	static const char *names[] = {"NONE", "POWEROFF", "REBOOT", "CRASHED", "INTERNAL_ERROR"};
	return kind < sizeof(names) / sizeof(names[0]) ? names[kind] : "UNKNOWN";
}

/* Every vCPU (the machine paused for a moment to read them), then the devices. */
static void dump(struct fl_vm *vm)
{
	static char vcpus[256 * FL_MAX_VCPUS], devices[16384];
	int n;

	fprintf(stderr, "\nflotilla-vmm: where the guest stands\n");
	if (fl_vm_pause(vm) < 0) {
		fprintf(stderr, "cannot pause it: %s\n", fl_vm_error(vm));
	} else {
		n = fl_vm_describe_vcpus(vm, vcpus, sizeof(vcpus));
		fl_vm_resume(vm);
		fprintf(stderr, "%s", n < 0 ? fl_vm_error(vm) : vcpus);
	}
	n = fl_vm_describe(vm, devices, sizeof(devices));
	fprintf(stderr, "%s", n < 0 ? fl_vm_error(vm) : devices);
}

int main(int argc, char **argv)
{
	struct fl_config cfg;
	struct fl_disk_config disks[FL_MAX_DISKS];
	struct fl_nic_config nics[FL_MAX_NICS];
	uint64_t memory = 128, vcpus = 1;
	int status = EXIT_STOPPED, interactive = isatty(0);
	struct termios saved;
	struct relay relay = {.write_fd = -1};
	int relay_pipe[2] = {-1, -1};
	char summary[96] = "stopped from the host";
	struct fl_vm *vm;
	double started = now_s(), running = -1;

	memset(&cfg, 0, sizeof(cfg));
	memset(disks, 0, sizeof(disks));
	memset(nics, 0, sizeof(nics));
	for (int i = 1; i < argc; i++) {
		const char *name = argv[i], *value;
		char *eq = strchr(argv[i], '=');
		char flag[32];

		if (!strcmp(name, "-h") || !strcmp(name, "--help")) {
			printf("flotilla-vmm --kernel PATH [--initrd PATH] [--cmdline TEXT] "
			       "[--memory MiB] [--vcpus N] [--memfd] [--disk PATH[,ro]]... "
			       "[--tap NAME]...\n");
			return 0;
		}
		if (!strcmp(name, "--memfd")) {
			cfg.flags |= FL_CONFIG_MEMFD;
			continue;
		}
		if (eq) {
			size_t len = (size_t)(eq - argv[i]);
			if (len >= sizeof(flag))
				return usage("unknown argument %s", argv[i]);
			memcpy(flag, argv[i], len);
			flag[len] = '\0';
			name = flag;
			value = eq + 1;
		} else {
			if (i + 1 >= argc)
				return usage("%s needs a value", name);
			value = argv[++i];
		}
		if (!strcmp(name, "--kernel")) {
			cfg.kernel_path = value;
		} else if (!strcmp(name, "--initrd")) {
			cfg.initrd_path = value;
		} else if (!strcmp(name, "--cmdline")) {
			cfg.cmdline = value;
		} else if (!strcmp(name, "--memory")) {
			if (parse_uint(value, FL_MAX_MEMORY_MIB, &memory) < 0)
				return usage("--memory takes MiB, 1..65536, not %s", value);
		} else if (!strcmp(name, "--vcpus")) {
			if (parse_uint(value, FL_MAX_VCPUS, &vcpus) < 0)
				return usage("--vcpus takes 1..64, not %s", value);
		} else if (!strcmp(name, "--disk")) {
			char *path = strdup(value), *comma;
			if (!path)
				return usage("out of memory at %s", value);
			comma = strchr(path, ',');
			if (cfg.ndisks >= FL_MAX_DISKS)
				return usage("at most 4 disks (%s)", value);
			disks[cfg.ndisks].flags = 0;
			if (comma) {
				if (strcmp(comma, ",ro"))
					return usage("--disk takes PATH or PATH,ro, not %s", value);
				*comma = '\0';
				disks[cfg.ndisks].flags = FL_DISK_READONLY;
			}
			if (!*path)
				return usage("--disk takes PATH or PATH,ro, not %s", value);
			disks[cfg.ndisks++].path = path;
		} else if (!strcmp(name, "--tap")) {
			int fd;
			if (cfg.nnics >= FL_MAX_NICS)
				return usage("at most 4 NICs (%s)", value);
			if (!*value)
				return usage("--tap needs an interface name%s", "");
			fd = open_tap(value);
			if (fd < 0) {
				fprintf(stderr, "flotilla-vmm: tap %s: %s\n", value, strerror(-fd));
				return EXIT_USAGE;
			}
			nics[cfg.nnics].tap_fd = fd;
			/* A random locally administered address, as native.run's. */
			nics[cfg.nnics].mac[0] = 0x52;
			nics[cfg.nnics].mac[1] = 0x54;
			nics[cfg.nnics].mac[2] = 0x00;
			if (getrandom(&nics[cfg.nnics].mac[3], 3, 0) != 3)
				return usage("no randomness for a MAC address%s", "");
			cfg.nnics++;
		} else {
			return usage("unknown argument %s", argv[i]);
		}
	}
	if (!cfg.kernel_path)
		return usage("--kernel is required%s", "");
	cfg.memory_mib = memory;
	cfg.vcpus = (uint32_t)vcpus;
	cfg.console_out_fd = 1;
	cfg.console_in_fd = 0;
	cfg.disks = disks;
	cfg.nics = nics;
	if (interactive) {
		if (pipe2(relay_pipe, O_CLOEXEC) < 0)
			return usage("pipe: %s", strerror(errno));
		relay.write_fd = relay_pipe[1];
		cfg.console_in_fd = relay_pipe[0];
	}

	vm = fl_vm_new();
	if (!vm)
		return usage("out of memory%s", "");
	if (fl_vm_configure(vm, &cfg) < 0) {
		fprintf(stderr, "flotilla-vmm: %s\n", fl_vm_error(vm));
		fl_vm_destroy(vm);
		return EXIT_USAGE;
	}

	struct sigaction sa = {.sa_handler = on_stop};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sa.sa_handler = on_dump;
	sigaction(SIGUSR1, &sa, NULL);

	if (interactive) {
		struct termios raw;
		pthread_t t;
		tcgetattr(0, &saved);
		raw = saved;
		cfmakeraw(&raw);
		tcsetattr(0, TCSANOW, &raw);
		if (pthread_create(&t, NULL, relay_main, &relay) == 0)
			pthread_detach(t);
	}
	if (fl_vm_start(vm) < 0) {
		fprintf(stderr, "flotilla-vmm: %s\n", fl_vm_error(vm));
		status = EXIT_INTERNAL_ERROR;
		stop_asked = 1;
		snprintf(summary, sizeof(summary), "could not start");
	} else {
		running = now_s() - started;
	}
	while (!stop_asked) {
		struct pollfd p = {.fd = fl_event_fd(vm), .events = POLLIN};
		struct fl_event ev;
		int got;

		if (dump_asked) {
			dump_asked = 0;
			dump(vm);
		}
		if (poll(&p, 1, 200) < 0 && errno != EINTR)
			break;
		got = fl_event_read(vm, &ev);
		if (got <= 0)
			continue;
		status = exit_status(&ev);
		ev.reason[sizeof(ev.reason) - 1] = '\0';
		if (ev.code)
			snprintf(summary, sizeof(summary), "%s (%s, code %lld)", kind_name(ev.kind),
				 ev.reason, (long long)ev.code);
		else
			snprintf(summary, sizeof(summary), "%s (%s)", kind_name(ev.kind), ev.reason);
		break;
	}
	fl_vm_stop(vm);
	fl_vm_destroy(vm);
	if (interactive)
		tcsetattr(0, TCSADRAIN, &saved);
	if (running >= 0)
		fprintf(stderr, "\nflotilla-vmm: %s; vCPUs running %.3f s after the start, stopped at "
			"%.3f s\n", summary, running, now_s() - started);
	else
		fprintf(stderr, "\nflotilla-vmm: %s\n", summary);
	return status;
}
