/*
 * spawn PROGRAM [ARGS...]: run PROGRAM, then print "<wall ns> <peak RSS KiB> <exit status>"
 * on stderr. bench/boot.py measures children through this small process because Linux
 * charges a child's ru_maxrss with the RSS of the process that forked it (the pre-exec
 * image is counted at exec): from a Python parent every child would show >= its RSS.
 */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct timespec t0, t1;
	struct rusage ru;
	int status;

	if (argc < 2) {
		fprintf(stderr, "usage: spawn PROGRAM [ARGS...]\n");
		return 100;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	pid_t pid = fork();
	if (pid < 0) {
		perror("spawn: fork");
		return 100;
	}
	if (pid == 0) {
		execvp(argv[1], argv + 1);
		perror("spawn: exec");
		_exit(127);
	}
	if (wait4(pid, &status, 0, &ru) < 0) {
		perror("spawn: wait4");
		return 100;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	long long ns = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
	int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	fprintf(stderr, "%lld %ld %d\n", ns, ru.ru_maxrss, code);
	return 0;
}
