/*
 * no-peerpidfd: runs a command under a seccomp filter that makes
 * getsockopt(SOL_SOCKET, SO_PEERPIDFD) fail with ENOPROTOOPT, as on a kernel
 * older than 6.5 (Debian 12's 6.1), so tests can drive kvmvfiod's fallback —
 * a pidfd opened from the SO_PEERCRED pid — on a host whose kernel has
 * SO_PEERPIDFD. With --no-netlink, socket(AF_NETLINK) fails too
 * (EAFNOSUPPORT), as in a sandbox that allows only AF_UNIX, so sock_diag
 * cannot be asked either. Everything else is allowed.
 *
 *   no-peerpidfd [--no-netlink] CMD [ARG]...
 *
 * Build: gcc -O2 -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE no-peerpidfd.c
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

#define LOAD(field) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))
/* The low 32 bits of a syscall argument (x86_64 is little-endian). */
#define LOAD_ARG(n) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[n]))

int main(int argc, char **argv) {
	int no_netlink = argc > 1 && !strcmp(argv[1], "--no-netlink");
	struct sock_filter prog[] = {
		LOAD(arch),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		LOAD(nr),
		/* socket(AF_NETLINK, ...), when asked: EAFNOSUPPORT */
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, no_netlink ? __NR_socket : 0xffffffff, 0, 3),
		LOAD_ARG(0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_NETLINK, 0, 7),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EAFNOSUPPORT),
		/* getsockopt(SOL_SOCKET, SO_PEERPIDFD): ENOPROTOOPT */
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getsockopt, 0, 5),
		LOAD_ARG(1),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SOL_SOCKET, 0, 3),
		LOAD_ARG(2),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SO_PEERPIDFD, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOPROTOOPT),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog fprog = { .len = sizeof prog / sizeof prog[0], .filter = prog };

	if (argc < 2 + no_netlink) {
		fputs("usage: no-peerpidfd [--no-netlink] CMD [ARG]...\n", stderr);
		return 2;
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog) < 0) {
		fprintf(stderr, "no-peerpidfd: seccomp: %s\n", strerror(errno));
		return 2;
	}
	execvp(argv[1 + no_netlink], argv + 1 + no_netlink);
	fprintf(stderr, "no-peerpidfd: exec %s: %s\n", argv[1 + no_netlink], strerror(errno));
	return 127;
}
