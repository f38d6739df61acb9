/*
 * refvmm: a reference VMM in C (libc and the kernel's uapi headers only) for
 * kvmvfiod's handoff session protocol v1 (docs/session-protocol.md); it shows
 * the protocol needs neither TypeScript nor protobuf. Like src/vmm/reference.ts:
 *
 *   KVMVFIO_TOKEN=... refvmm SOCKET_PATH
 *
 * attaches with the token, makes its VM with the /dev/kvm fd it is given,
 * runs the tiny guest of src/vmm/tinyguest.ts to HLT, sends VM_CREATED, then
 * answers the daemon's requests with its own kernel's errnos until SHUTDOWN
 * or the end of the stream. One JSON line per event on stdout. With
 * KVMVFIO_USE_VFIO=1 it also uses each group it adds, after answering the
 * ADD_GROUP (see vfio_use). With the device-cdev handoff (an IOMMUFD fd at
 * ATTACH, ADD_DEVICE/REMOVE_DEVICE requests) it binds each device to that
 * iommufd, attaches it to one IOAS and adds it to its KVM-VFIO device (and,
 * with KVMVFIO_USE_VFIO=1, reads its vendor id and maps DMA: vfio_use_device). Exit: 0
 * shutdown or end of stream, 1 attach refused, 2 usage or system error,
 * 3 protocol error (a garbled record), 4 KVM or guest failure. exit() closes
 * every fd, which ends the session and, with it, the VM.
 *
 * KVMVFIO_FORK plays a VMM that forks after connecting (an attacker's test):
 * the parent prints {"event":"forked","child":PID} and the child goes on with
 * the session on the inherited connection. "early": the parent exits at
 * once and the child attaches only once the parent is gone and its control
 * fd is at its end. "late": the parent exits when its control fd is at its
 * end. The control fd is fd 3 when open, else stdin. "after-add": once its
 * first group is added (and used, with KVMVFIO_USE_VFIO), the VMM forks a
 * child that keeps every fd it has (the VM, the group) and prints
 * {"event":"holding","pid":PID}; the parent goes on serving. Either way the child, once its session ends, prints
 * {"event":"holding"} and keeps every fd it got (the VM, its groups) until
 * it is killed. KVMVFIO_SEND_AND_EXIT=1 plays a VMM that connects, waits for
 * its control fd to end, sends its ATTACH and exits at once, leaving its pid
 * free before the daemon reads the ATTACH (a pid-reuse attack's first half).
 * It attaches as edition 2 of the protocol (ATTACH arg bit 1: it applies S5's checks to what it receives),
 * or as edition 1 with KVMVFIO_EDITION=1 or when the daemon predates edition 2.
 * KVMVFIO_SLOW_ANSWER=TYPE:MS (CREATE_VFIO_DEVICE:1500, say) plays a VMM
 * that is late: it makes the first request of that type's call at once, then
 * sleeps MS ms before it sends the result (the daemon's deadline passes
 * while its kernel already holds the result).
 *
 * Build: gcc -O2 -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE refvmm.c
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define KVF_MAGIC 0x3146564bu /* the bytes "KVF1" */
#define HDR 32
#define MAX_REC 4096
#define MAX_FDS 8
#define RESULT 0x8000
enum { ATTACH = 1, VM_CREATED = 2, PING = 3, CREATE_VFIO_DEVICE = 16, ADD_GROUP = 17, REMOVE_GROUP = 18, SHUTDOWN = 19,
	ADD_DEVICE = 20, REMOVE_DEVICE = 21 };
enum { FD_KVM = 1, FD_VFIO_CONTAINER = 2, FD_VFIO_GROUP = 3, FD_IOMMUFD = 4, FD_VFIO_DEVICE = 5 };
#define ATTACH_EDITION2 2u    /* ATTACH arg bit 1: this VMM follows edition 2 of the document */
#define REFUSAL_TOKEN_KEPT 1u /* edition 2, a refused ATTACH result's arg: the token is still good */

/* The edition both sides follow, from the ATTACH exchange: edition 2 adds S5's checks on what is received. */
static int edition = 2;

/*
 * The device-cdev handoff (Linux 6.6+). Debian 12's uapi headers (6.1) have neither iommufd.h nor the
 * cdev ioctls, so they are spelled out here (include/uapi/linux/iommufd.h and vfio.h: _IO(';', nr),
 * each struct starting with its size).
 */
struct kvf_bind { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; };  /* vfio_device_bind_iommufd */
struct kvf_attach { uint32_t argsz, flags, pt_id; };                              /* vfio_device_attach_iommufd_pt */
struct kvf_ioas_alloc { uint32_t size, flags, out_ioas_id; };                       /* iommu_ioas_alloc */
struct kvf_ioas_map { uint32_t size, flags, ioas_id, reserved; uint64_t user_va, length, iova; }; /* iommu_ioas_map */
#define KVF_VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define KVF_VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#define KVF_IOMMU_IOAS_ALLOC _IO(';', 0x81)
#define KVF_IOMMU_IOAS_MAP _IO(';', 0x85)
#define KVF_MAP_FIXED_IOVA 1
#define KVF_MAP_WRITEABLE 2
#define KVF_MAP_READABLE 4
/* KVM_DEV_VFIO_FILE, _FILE_ADD, _FILE_DEL: older headers call them _GROUP, _GROUP_ADD, _GROUP_DEL. */
enum { VFIO_FILE = 1, VFIO_FILE_ADD = 1, VFIO_FILE_DEL = 2 };
#define SERIAL_PORT 0x3f8
#define GUEST_MEM 0x10000 /* 64 KiB at guest physical 0 */
#define GUEST_ENTRY 0x1000 /* cs:ip = 0000:1000; the message follows the 16 code bytes */
#define MAX_KEPT 256
#define DMA_SIZE (1u << 20) /* 1 MiB per group, mapped at iova group × 2 MiB */

struct rec {
	unsigned type, seq, nfds, text_len;
	int32_t status;
	uint64_t arg;
	uint32_t kind[MAX_FDS], id[MAX_FDS];
	int fds[MAX_FDS];
	char text[MAX_REC];
};

static const char *type_name(unsigned t) {
	static const char *const names[] = { [ATTACH] = "ATTACH", [VM_CREATED] = "VM_CREATED", [PING] = "PING",
		[CREATE_VFIO_DEVICE] = "CREATE_VFIO_DEVICE", [ADD_GROUP] = "ADD_GROUP", [REMOVE_GROUP] = "REMOVE_GROUP", [SHUTDOWN] = "SHUTDOWN",
		[ADD_DEVICE] = "ADD_DEVICE", [REMOVE_DEVICE] = "REMOVE_DEVICE" };
	t &= ~RESULT;
	return t < sizeof names / sizeof *names ? names[t] : NULL;
}

static uint64_t get_le(const unsigned char *p, int n) {
	uint64_t v = 0;
	while (n-- > 0) v = v << 8 | p[n];
	return v;
}

static void put_le(unsigned char *p, uint64_t v, int n) {
	for (int i = 0; i < n; i++, v >>= 8) p[i] = (unsigned char)v;
}

/* A JSON string of n bytes: quotes, backslashes and control bytes escaped; UTF-8 passes through. */
static void json_str(const char *s, size_t n) {
	putchar('"');
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') printf("\\%c", c);
		else if (c == '\n') fputs("\\n", stdout);
		else if (c < 0x20 || c == 0x7f) printf("\\u%04x", c);
		else putchar(c);
	}
	putchar('"');
}

/* Closes an event line and flushes it, so that a reader sees each event at once. */
static void end_event(void) {
	fputs("}\n", stdout);
	fflush(stdout);
}

static void event_reason(const char *event, const char *reason) {
	printf("{\"event\":\"%s\",\"reason\":", event);
	json_str(reason, strlen(reason));
	end_event();
}

static _Noreturn void fail(int code, const char *call, int err) {
	printf("{\"event\":\"error\",\"call\":\"%s\",\"errno\":%d,\"reason\":", call, err);
	json_str(strerror(err), strlen(strerror(err)));
	end_event();
	exit(code);
}

static _Noreturn void garbled(const char *why) {
	event_reason("protocol-error", why);
	exit(3);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *call) {
	int r = ioctl(fd, req, arg);
	if (r < 0) fail(4, call, errno);
	return r;
}

/* Receives one record into r; 0 at the end of the stream. A garbled record (the document's list) exits. */
static int recv_rec(int sock, struct rec *r) {
	unsigned char b[MAX_REC + 1]; /* a longer record is cut and flagged MSG_TRUNC */
	union { struct cmsghdr h; char c[CMSG_SPACE(MAX_FDS * sizeof(int))]; } cm;
	struct iovec iov = { b, sizeof b };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.c, .msg_controllen = sizeof cm.c };
	ssize_t n;
	unsigned got = 0;

	do n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == ECONNRESET) return 0;
	if (n < 0) fail(2, "recvmsg", errno);
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && got < MAX_FDS; i++)
				memcpy(&r->fds[got++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	if (n == 0 && got == 0) return 0;
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) garbled("record or its fds were truncated (MSG_TRUNC/MSG_CTRUNC)");
	if (n < HDR) garbled("record shorter than the 32-byte header");
	if (get_le(b, 4) != KVF_MAGIC) garbled("bad magic");
	if (get_le(b + 4, 2) != 1) garbled("unsupported protocol version");
	if (get_le(b + 28, 4) != 0) garbled("reserved header field is not 0");
	r->type = (unsigned)get_le(b + 6, 2);
	r->seq = (unsigned)get_le(b + 8, 4);
	r->status = (int32_t)(uint32_t)get_le(b + 12, 4);
	r->arg = get_le(b + 16, 8);
	r->nfds = (unsigned)get_le(b + 24, 2);
	r->text_len = (unsigned)get_le(b + 26, 2);
	if ((size_t)n != HDR + 8 * (size_t)r->nfds + r->text_len) garbled("record length is not 32 + 8*nfds + text_len");
	if (r->nfds != got) garbled("manifest entries and fds received differ");
	if (!type_name(r->type)) garbled("unknown message type");
	for (unsigned i = 0; i < r->nfds; i++) {
		r->kind[i] = (uint32_t)get_le(b + HDR + 8 * i, 4);
		r->id[i] = (uint32_t)get_le(b + HDR + 8 * i + 4, 4);
		if (r->kind[i] < FD_KVM || r->kind[i] > FD_VFIO_DEVICE) garbled("unknown fd kind in the manifest");
	}
	memcpy(r->text, b + HDR + 8 * r->nfds, r->text_len);
	r->text[r->text_len] = '\0';
	if (edition == 2) { /* S5 */
		if (memchr(r->text, '\0', r->text_len)) garbled("text holds a NUL byte");
		if (r->type & RESULT) {
			if (r->type != (ATTACH | RESULT) && r->arg) garbled("a result other than ATTACH's with a nonzero arg");
		} else {
			if (r->status) garbled("a request with a nonzero status");
			if ((r->type == VM_CREATED || r->type == PING || r->type == CREATE_VFIO_DEVICE || r->type == SHUTDOWN) && r->arg)
				garbled("a request with a nonzero arg where its type has 0");
		}
	}
	return 1;
}

/* Sends a record without fds: requests have status 0, results echo their request's seq. */
static void send_rec(int sock, unsigned type, unsigned seq, int status, uint64_t arg, const char *text) {
	unsigned char b[MAX_REC] = { 0 };
	size_t len = strlen(text) < MAX_REC - HDR ? strlen(text) : MAX_REC - HDR;
	ssize_t n;

	put_le(b, KVF_MAGIC, 4);
	put_le(b + 4, 1, 2); /* version */
	put_le(b + 6, type, 2);
	put_le(b + 8, seq, 4);
	put_le(b + 12, (uint32_t)status, 4);
	put_le(b + 16, arg, 8);
	put_le(b + 26, len, 2);
	memcpy(b + HDR, text, len);
	do n = send(sock, b, HDR + len, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0) { /* the daemon is gone: the session has ended */
		event_reason("closed", strerror(errno));
		exit(0);
	}
}

/* Runs the tiny guest on vm: RAM in slot 0, vCPU 0 in real mode at 0000:1000, OUTs to 0x3f8 collected until HLT. */
static void run_guest(int kvm, int vm, const char *msg) {
	static const unsigned char code[] = {
		0xba, 0xf8, 0x03, /* mov dx, 0x3f8 */
		0xbe, 0x10, 0x10, /* mov si, 0x1010 (the message) */
		0xb9, 0x00, 0x00, /* mov cx, <length> (patched) */
		0xe3, 0x04,       /* jcxz hlt */
		0xac,             /* lodsb */
		0xee,             /* out dx, al */
		0xe2, 0xfc,       /* loop lodsb */
		0xf4,             /* hlt */
	};
	size_t len = strlen(msg), got = 0, exits = 0;
	char serial[512];
	int halted = 0;

	unsigned char *mem = mmap(NULL, GUEST_MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) fail(4, "mmap(guest memory)", errno);
	memcpy(mem + GUEST_ENTRY, code, sizeof code);
	put_le(mem + GUEST_ENTRY + 7, len, 2);
	memcpy(mem + GUEST_ENTRY + sizeof code, msg, len);
	struct kvm_userspace_memory_region region = { .slot = 0, .memory_size = GUEST_MEM, .userspace_addr = (uintptr_t)mem };
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
	int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, NULL, "KVM_GET_VCPU_MMAP_SIZE");
	int vcpu = xioctl(vm, KVM_CREATE_VCPU, NULL, "KVM_CREATE_VCPU");
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) fail(4, "mmap(kvm_run)", errno);

	/* A new vCPU is at the reset vector, already in real mode: point cs, and ds for lodsb, at 0. */
	struct kvm_sregs sregs;
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	sregs.cs.base = 0, sregs.cs.selector = 0, sregs.ds.base = 0, sregs.ds.selector = 0;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	struct kvm_regs regs;
	xioctl(vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
	regs.rip = GUEST_ENTRY, regs.rflags = 0x2;
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	for (; !halted && exits < len + 64; exits++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR) continue; /* KVM_EXIT_INTR: run again */
			fail(4, "KVM_RUN", errno);
		}
		if (run->exit_reason == KVM_EXIT_HLT) {
			halted = 1;
		} else if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.port == SERIAL_PORT) {
			size_t n = (size_t)run->io.size * run->io.count;
			if (run->io.data_offset + n > (size_t)run_size || got + n > sizeof serial) fail(4, "KVM_EXIT_IO", ERANGE);
			memcpy(serial + got, (char *)run + run->io.data_offset, n);
			got += n;
		} else {
			printf("{\"event\":\"error\",\"call\":\"KVM_RUN\",\"exit_reason\":%u", run->exit_reason);
			end_event();
			exit(4);
		}
	}
	/* Undo in reverse; the VM keeps vCPU 0 until the VM is closed, as KVM does. */
	munmap(run, (size_t)run_size);
	close(vcpu);
	region.memory_size = 0;
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION(delete)");
	munmap(mem, GUEST_MEM);

	fputs("{\"event\":\"guest\",\"serial\":", stdout);
	json_str(serial, got);
	printf(",\"halted\":%s,\"exits\":%zu", halted ? "true" : "false", exits);
	end_event();
}

/* A sysfs PCI device name, DDDD:BB:DD.F (the domain may have more digits). */
static int is_pci(const char *s) {
	static const char hex[] = "0123456789abcdef";
	size_t n = strlen(s);
	return n >= 12 && strspn(s, hex) == n - 8 && s[n - 8] == ':' && strspn(s + n - 7, hex) == 2 && s[n - 5] == ':'
		&& strspn(s + n - 4, hex) == 2 && s[n - 2] == '.' && s[n - 1] >= '0' && s[n - 1] <= '7';
}

/*
 * KVMVFIO_USE_VFIO=1: uses a group just added to the KVM-VFIO device as a VMM would (include/uapi/linux/vfio.h):
 * puts it in the container, sets the IOMMU once, opens its first PCI device, reads the vendor id from config
 * space and maps 1 MiB for DMA, kept until exit. One "vfio-use" event line either way; the session goes on.
 */
static void vfio_use(int container, uint64_t group, int gfd) {
	static int iommu_set, nmapped;
	static uint64_t mapped[MAX_KEPT]; /* groups whose DMA window is mapped: a re-ADD does not map it again */
	struct vfio_group_status gs = { .argsz = sizeof gs };
	struct vfio_region_info ri = { .argsz = sizeof ri, .index = VFIO_PCI_CONFIG_REGION_INDEX };
	struct vfio_iommu_type1_dma_map dma = { .argsz = sizeof dma, .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.iova = group << 21, .size = DMA_SIZE };
	unsigned long long g = (unsigned long long)group;
	char path[64], dev_name[sizeof ((struct dirent *)0)->d_name] = "";
	unsigned char vendor[2];
	const char *step;
	int err, dfd = -1, i;
	ssize_t n;
	DIR *dir;

	if (container < 0) {
		printf("{\"event\":\"vfio-use\",\"group\":%llu,\"ok\":false,\"step\":\"container\",\"errno\":0,\"reason\":\"no container\"", g);
		end_event();
		return;
	}
	step = "set_container"; /* each failure below jumps to out with errno set by the failed call */
	if (ioctl(gfd, VFIO_GROUP_GET_STATUS, &gs) < 0) goto out;
	if (!(gs.flags & VFIO_GROUP_FLAGS_CONTAINER_SET) && ioctl(gfd, VFIO_GROUP_SET_CONTAINER, &container) < 0) goto out;
	step = "set_iommu";
	if (!iommu_set) {
		int type = ioctl(container, VFIO_CHECK_EXTENSION, (unsigned long)VFIO_TYPE1v2_IOMMU) > 0 ? VFIO_TYPE1v2_IOMMU : VFIO_TYPE1_IOMMU;
		if (ioctl(container, VFIO_SET_IOMMU, (unsigned long)type) < 0) goto out;
		iommu_set = 1;
	}
	step = "sysfs";
	snprintf(path, sizeof path, "/sys/kernel/iommu_groups/%llu/devices", g);
	if (!(dir = opendir(path))) goto out;
	for (struct dirent *e; (e = readdir(dir));)
		if (is_pci(e->d_name) && (!*dev_name || strcmp(e->d_name, dev_name) < 0)) strcpy(dev_name, e->d_name);
	closedir(dir);
	if (!*dev_name) {
		errno = ENOENT; /* no PCI device in the group */
		goto out;
	}
	step = "get_device_fd";
	if ((dfd = ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, dev_name)) < 0) goto out;
	step = "region_info";
	if (ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, &ri) < 0) goto out;
	step = "pread";
	if ((n = pread(dfd, vendor, sizeof vendor, (off_t)ri.offset)) != (ssize_t)sizeof vendor) {
		if (n >= 0) errno = EIO; /* a short read */
		goto out;
	}
	step = "map_dma";
	for (i = 0; i < nmapped && mapped[i] != group; i++);
	if (i == nmapped) {
		void *mem = mmap(NULL, DMA_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED) goto out;
		dma.vaddr = (uintptr_t)mem;
		if (ioctl(container, VFIO_IOMMU_MAP_DMA, &dma) < 0) {
			err = errno;
			munmap(mem, DMA_SIZE);
			errno = err;
			goto out;
		}
		if (nmapped < MAX_KEPT) mapped[nmapped++] = group;
	}
	close(dfd);
	printf("{\"event\":\"vfio-use\",\"group\":%llu,\"ok\":true,\"device\":", g);
	json_str(dev_name, strlen(dev_name));
	printf(",\"vendor\":\"0x%04x\",\"dma\":true", (unsigned)get_le(vendor, 2));
	end_event();
	return;
out:
	err = errno;
	if (dfd >= 0) close(dfd);
	printf("{\"event\":\"vfio-use\",\"group\":%llu,\"ok\":false,\"step\":\"%s\",\"errno\":%d,\"reason\":", g, step, err);
	json_str(strerror(err), strlen(strerror(err)));
	end_event();
}

/* Set in a forked child (KVMVFIO_FORK): at the session's end, keep every fd until killed. */
static int hold_after_end;

/* Reads `fd` to its end; a non-blocking fd (a socketpair its parent made so) is polled. */
static void wait_eof(int fd) {
	char b[64];
	for (;;) {
		ssize_t n = read(fd, b, sizeof b);
		if (n > 0 || (n < 0 && errno == EINTR)) continue;
		if (n < 0 && errno == EAGAIN) {
			struct pollfd p = { .fd = fd, .events = POLLIN };
			poll(&p, 1, -1);
			continue;
		}
		return;
	}
}

/* KVMVFIO_FORK: returns 1 in the child; the parent exits here (see the header). */
static int fork_after_connect(const char *mode, int control) {
	int gone[2];
	char b;
	if (strcmp(mode, "early") && strcmp(mode, "late")) fail(2, "KVMVFIO_FORK (early or late)", EINVAL);
	if (pipe(gone) < 0) fail(2, "pipe", errno);
	fflush(stdout);
	pid_t child = fork();
	if (child < 0) fail(2, "fork", errno);
	if (child > 0) {
		close(gone[0]);
		printf("{\"event\":\"forked\",\"child\":%d", (int)child);
		end_event();
		if (!strcmp(mode, "late")) wait_eof(control);
		_exit(0); /* closes the pipe: the child of "early" goes on */
	}
	close(gone[1]);
	if (!strcmp(mode, "early")) {
		while (read(gone[0], &b, 1) > 0);
		wait_eof(control);
	}
	close(gone[0]);
	return 1;
}

/* The session is over: a forked child (KVMVFIO_FORK) keeps what it holds until it is killed. */
static void end_session(int code) {
	if (hold_after_end) {
		printf("{\"event\":\"holding\",\"pid\":%d", (int)getpid());
		end_event();
		for (;;) pause();
	}
	exit(code);
}

/*
 * KVMVFIO_USE_VFIO=1 with the device-cdev handoff: the device (bound and attached by ADD_DEVICE) has its
 * vendor id read from config space and 1 MiB mapped for DMA in the IOAS. One "vfio-use" event either way.
 */
static void vfio_use_device(int iommufd, uint32_t ioas, uint64_t id, int dfd) {
	static int nmapped;
	struct vfio_region_info ri = { .argsz = sizeof ri, .index = VFIO_PCI_CONFIG_REGION_INDEX };
	struct kvf_ioas_map map = { .size = sizeof map, .flags = KVF_MAP_FIXED_IOVA | KVF_MAP_READABLE | KVF_MAP_WRITEABLE,
		.ioas_id = ioas, .length = DMA_SIZE };
	unsigned char vendor[2];
	const char *step = "region_info";
	char addr[16];
	void *mem = MAP_FAILED;
	ssize_t n;
	int err;

	snprintf(addr, sizeof addr, "%04x:%02x:%02x.%x", (unsigned)(id >> 16), (unsigned)((id >> 8) & 0xff), (unsigned)((id >> 3) & 0x1f), (unsigned)(id & 7));
	if (ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, &ri) < 0) goto out;
	step = "pread";
	if ((n = pread(dfd, vendor, sizeof vendor, (off_t)ri.offset)) != (ssize_t)sizeof vendor) {
		if (n >= 0) errno = EIO;
		goto out;
	}
	step = "ioas_map";
	if ((mem = mmap(NULL, DMA_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) == MAP_FAILED) goto out;
	map.user_va = (uintptr_t)mem, map.iova = (uint64_t)(++nmapped) << 21;
	if (ioctl(iommufd, KVF_IOMMU_IOAS_MAP, &map) < 0) {
		err = errno;
		munmap(mem, DMA_SIZE);
		errno = err;
		goto out;
	}
	printf("{\"event\":\"vfio-use\",\"device\":\"%s\",\"ok\":true,\"vendor\":\"0x%04x\",\"dma\":true", addr, (unsigned)get_le(vendor, 2));
	end_event();
	return;
out:
	err = errno;
	printf("{\"event\":\"vfio-use\",\"device\":\"%s\",\"ok\":false,\"step\":\"%s\",\"errno\":%d,\"reason\":", addr, step, err);
	json_str(strerror(err), strlen(strerror(err)));
	end_event();
}

int main(int argc, char **argv) {
	const char *token = getenv("KVMVFIO_TOKEN"), *use = getenv("KVMVFIO_USE_VFIO");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct rec r;
	int kvm = -1, container = -1, iommufd = -1, dev = -1, nkept = 0, ndev = 0;
	uint32_t ioas = 0; /* the IOAS the devices attach to, allocated at the first ADD_DEVICE */
	struct { uint64_t id; int fd; } devs[MAX_KEPT]; /* device cdevs added, for REMOVE_DEVICE */
	struct { uint64_t group; int fd; } kept[MAX_KEPT]; /* group fds added to the device, for REMOVE_GROUP */
	char text[256];

	if (argc != 2 || !token || !*token || strlen(argv[1]) >= sizeof sa.sun_path) {
		fputs("usage: KVMVFIO_TOKEN=TOKEN refvmm SOCKET_PATH\n", stderr);
		return 2;
	}
	strcpy(sa.sun_path, argv[1]);
	int control = fcntl(3, F_GETFD) >= 0 ? 3 : 0; /* KVMVFIO_FORK's control fd: looked at before fd 3 is ours */
	int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0) fail(2, "socket", errno);
	if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0) fail(2, "connect", errno);
	const char *forking = getenv("KVMVFIO_FORK");
	int fork_after_add = forking && !strcmp(forking, "after-add");
	if (forking && *forking && !fork_after_add) hold_after_end = fork_after_connect(forking, control);

	/* KVMVFIO_SLOW_ANSWER=TYPE:MS: the first request of that type is answered MS ms after its call. */
	const char *slow = getenv("KVMVFIO_SLOW_ANSWER"), *slow_ms = slow ? strchr(slow, ':') : NULL;
	size_t slow_len = slow_ms ? (size_t)(slow_ms - slow) : 0;
	long slow_delay = slow_ms ? strtol(slow_ms + 1, NULL, 10) : 0;
	if (slow && (!slow_ms || slow_delay <= 0)) fail(2, "KVMVFIO_SLOW_ANSWER (TYPE:MS)", EINVAL);

	const char *send_and_exit = getenv("KVMVFIO_SEND_AND_EXIT");
	if (send_and_exit && !strcmp(send_and_exit, "1")) {
		/* A child keeps the connection open (and sends nothing) once this process is gone. */
		fflush(stdout);
		pid_t keeper = fork();
		if (keeper < 0) fail(2, "fork", errno);
		if (keeper == 0)
			for (;;) pause();
		printf("{\"event\":\"keeper\",\"child\":%d", (int)keeper);
		end_event();
		wait_eof(control);
		send_rec(sock, ATTACH, 1, 0, 0, token);
		_exit(0);
	}
	/* Edition 2 (ATTACH arg bit 1) unless KVMVFIO_EDITION=1; a daemon that predates it closes the session
	 * without a result (or answers EOPNOTSUPP without bit 1 in arg), the token unspent: attach again as edition 1. */
	const char *ed = getenv("KVMVFIO_EDITION");
	edition = ed && !strcmp(ed, "1") ? 1 : 2;
	send_rec(sock, ATTACH, 1, 0, edition == 2 ? ATTACH_EDITION2 : 0, token);
	int got = recv_rec(sock, &r);
	if (edition == 2 && !hold_after_end && (!got || (r.type == (ATTACH | RESULT) && r.status == EOPNOTSUPP && !(r.arg & ATTACH_EDITION2)))) {
		close(sock);
		edition = 1;
		if ((sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0)) < 0) fail(2, "socket", errno);
		if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0) fail(2, "connect", errno);
		send_rec(sock, ATTACH, 1, 0, 0, token);
		got = recv_rec(sock, &r);
	}
	if (!got) {
		printf("{\"event\":\"attach-refused\",\"errno\":%d,\"reason\":\"the daemon closed the session\"", ECONNRESET);
		end_event();
		return 1;
	}
	if (r.type != (ATTACH | RESULT) || r.seq != 1) garbled("expected the ATTACH result");
	if (r.status != 0) {
		printf("{\"event\":\"attach-refused\",\"errno\":%d,\"token_kept\":%s,\"reason\":", (int)r.status,
			edition == 2 && r.arg & REFUSAL_TOKEN_KEPT ? "true" : "false");
		json_str(r.text, r.text_len);
		end_event();
		return 1;
	}
	/* One KVM fd and, where the host has /dev/vfio/vfio, one VFIO_CONTAINER fd (kept open; used by vfio_use). */
	for (unsigned i = 0; i < r.nfds; i++) {
		if (r.kind[i] == FD_KVM && kvm < 0 && r.id[i] == 0) kvm = r.fds[i];
		else if (r.kind[i] == FD_VFIO_CONTAINER && container < 0 && r.id[i] == 0) container = r.fds[i];
		else if (r.kind[i] == FD_IOMMUFD && iommufd < 0 && r.id[i] == 0) iommufd = r.fds[i];
		else garbled("unexpected fd in the ATTACH result");
	}
	if (kvm < 0) garbled("the ATTACH result carries no /dev/kvm fd");
	const char *name = memchr(r.text, ' ', r.text_len); /* text: "<vm id> <vm name>" */
	size_t idlen = name ? (size_t)(name - r.text) : r.text_len;
	fputs("{\"event\":\"attached\",\"vm\":", stdout);
	json_str(r.text, idlen);
	fputs(",\"name\":", stdout);
	json_str(name ? name + 1 : "", name ? r.text_len - idlen - 1 : 0);
	printf(",\"memlock\":%llu,\"container\":%s,\"iommufd\":%s,\"uid\":%u,\"edition\":%d", (unsigned long long)r.arg, container >= 0 ? "true" : "false",
		iommufd >= 0 ? "true" : "false", (unsigned)getuid(), edition);
	end_event();

	int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	run_guest(kvm, vm, "kvmvfio guest ok\n");
	send_rec(sock, VM_CREATED, 2, 0, 0, "");
	/* The plan's requests were queued behind the ATTACH result: read them only now, with the VM made. */

	for (int created_answered = 0;;) {
		if (!recv_rec(sock, &r)) {
			event_reason("closed", "the daemon closed the session");
			end_session(0);
		}
		if (r.type & RESULT) { /* from here the only request this VMM has sent is VM_CREATED */
			if (r.type != (VM_CREATED | RESULT) || r.seq != 2 || created_answered++ || r.nfds) garbled("a result that answers no request");
			if (r.status != 0) fail(3, "VM_CREATED", (int)r.status);
			continue;
		}
		/* fds come only with ADD_GROUP: exactly one, a VFIO_GROUP whose id is the group number. */
		if (r.type == ADD_GROUP ? r.nfds != 1 || r.kind[0] != FD_VFIO_GROUP || r.id[0] != r.arg
		    : r.type == ADD_DEVICE ? r.nfds != 1 || r.kind[0] != FD_VFIO_DEVICE || r.id[0] != r.arg : r.nfds != 0)
			garbled("the manifest does not match the request type");
		int err = 0, i;
		const char *call = type_name(r.type);
		struct kvm_device_attr attr = { .group = VFIO_FILE };
		int32_t file; /* attr.addr points at the VFIO file's fd */
		switch (r.type) {
		case CREATE_VFIO_DEVICE: {
			/* A second device is asked of the kernel too, so that the answer is its own EBUSY. */
			struct kvm_create_device cd = { .type = KVM_DEV_TYPE_VFIO };
			call = "KVM_CREATE_DEVICE(VFIO)";
			if (ioctl(vm, KVM_CREATE_DEVICE, &cd) < 0) err = errno;
			else if (dev < 0) dev = (int)cd.fd;
			else close((int)cd.fd);
			break;
		}
		case ADD_GROUP: /* kept on success, closed on failure */
			call = "KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)";
			file = r.fds[0], attr.attr = VFIO_FILE_ADD, attr.addr = (uintptr_t)&file;
			for (i = 0; i < nkept && kept[i].group != r.arg; i++);
			if (dev < 0) err = ENODEV;
			else if (i == MAX_KEPT) err = EMFILE;
			else if (ioctl(dev, KVM_SET_DEVICE_ATTR, &attr) < 0) err = errno;
			if (err) {
				close(r.fds[0]);
				break;
			}
			if (i < nkept) close(kept[i].fd); /* the fd of an earlier ADD of this group */
			else nkept++;
			kept[i].group = r.arg, kept[i].fd = r.fds[0];
			break;
		case REMOVE_GROUP: /* with the fd kept from ADD_GROUP, closed on success */
			call = "KVM_SET_DEVICE_ATTR(VFIO_FILE_DEL)";
			for (i = 0; i < nkept && kept[i].group != r.arg; i++);
			file = i < nkept ? kept[i].fd : -1, attr.attr = VFIO_FILE_DEL, attr.addr = (uintptr_t)&file;
			if (dev < 0 || i == nkept) err = ENOENT;
			else if (ioctl(dev, KVM_SET_DEVICE_ATTR, &attr) < 0) err = errno;
			else close(kept[i].fd), kept[i] = kept[--nkept];
			break;
		case ADD_DEVICE: /* bind to our iommufd, attach to our IOAS, add to the KVM-VFIO device; kept on success */
			call = "ADD_DEVICE";
			for (i = 0; i < ndev && devs[i].id != r.arg; i++);
			if (dev < 0) err = ENODEV;
			else if (iommufd < 0) err = EBADF;
			else if (i == MAX_KEPT) err = EMFILE;
			else {
				struct kvf_bind bind = { .argsz = sizeof bind, .iommufd = iommufd };
				struct kvf_attach at = { .argsz = sizeof at };
				call = "VFIO_DEVICE_BIND_IOMMUFD";
				if (ioctl(r.fds[0], KVF_VFIO_DEVICE_BIND_IOMMUFD, &bind) < 0) err = errno;
				if (!err && !ioas) {
					struct kvf_ioas_alloc al = { .size = sizeof al };
					call = "IOMMU_IOAS_ALLOC";
					if (ioctl(iommufd, KVF_IOMMU_IOAS_ALLOC, &al) < 0) err = errno;
					else ioas = al.out_ioas_id;
				}
				at.pt_id = ioas;
				if (!err) call = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
				if (!err && ioctl(r.fds[0], KVF_VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at) < 0) err = errno;
				file = r.fds[0], attr.attr = VFIO_FILE_ADD, attr.addr = (uintptr_t)&file;
				if (!err) call = "KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)";
				if (!err && ioctl(dev, KVM_SET_DEVICE_ATTR, &attr) < 0) err = errno;
			}
			if (err) {
				close(r.fds[0]);
				break;
			}
			if (i < ndev) close(devs[i].fd);
			else ndev++;
			devs[i].id = r.arg, devs[i].fd = r.fds[0];
			break;
		case REMOVE_DEVICE: /* with the fd kept from ADD_DEVICE, closed (so unbound) on success */
			call = "KVM_SET_DEVICE_ATTR(VFIO_FILE_DEL)";
			for (i = 0; i < ndev && devs[i].id != r.arg; i++);
			file = i < ndev ? devs[i].fd : -1, attr.attr = VFIO_FILE_DEL, attr.addr = (uintptr_t)&file;
			if (dev < 0 || i == ndev) err = ENOENT;
			else if (ioctl(dev, KVM_SET_DEVICE_ATTR, &attr) < 0) err = errno;
			else close(devs[i].fd), devs[i] = devs[--ndev];
			break;
		case PING:
		case SHUTDOWN:
			break;
		default: /* ATTACH and VM_CREATED are not the daemon's to send */
			err = EOPNOTSUPP;
		}
		if (err && (r.type == ADD_DEVICE || r.type == REMOVE_DEVICE))
			snprintf(text, sizeof text, "%s, device %04llx:%02llx:%02llx.%llx: %s", call, (unsigned long long)(r.arg >> 16), (unsigned long long)((r.arg >> 8) & 0xff),
				(unsigned long long)((r.arg >> 3) & 0x1f), (unsigned long long)(r.arg & 7), strerror(err));
		else if (err && (r.type == ADD_GROUP || r.type == REMOVE_GROUP))
			snprintf(text, sizeof text, "%s, group %llu: %s", call, (unsigned long long)r.arg, strerror(err));
		else if (err) snprintf(text, sizeof text, "%s: %s", call, strerror(err));
		else snprintf(text, sizeof text, "%s", r.type == PING ? "pong" : r.type == SHUTDOWN ? "stopping" : "ok");
		if (slow_len && strlen(type_name(r.type)) == slow_len && !strncmp(type_name(r.type), slow, slow_len)) {
			struct timespec ts = { .tv_sec = slow_delay / 1000, .tv_nsec = slow_delay % 1000 * 1000000 };
			slow_len = 0; /* the first such request only */
			printf("{\"event\":\"slow-answer\",\"type\":\"%s\",\"ms\":%ld", type_name(r.type), slow_delay);
			end_event();
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR);
		}
		send_rec(sock, r.type | RESULT, r.seq, err, 0, text);
		printf("{\"event\":\"request\",\"type\":\"%s\",\"arg\":%llu,\"errno\":%d", type_name(r.type), (unsigned long long)r.arg, err);
		end_event();
		if (r.type == ADD_GROUP && !err && use && !strcmp(use, "1")) vfio_use(container, r.arg, r.fds[0]);
		if (r.type == ADD_DEVICE && !err && use && !strcmp(use, "1")) vfio_use_device(iommufd, ioas, r.arg, r.fds[0]);
		if (r.type == ADD_GROUP && !err && fork_after_add) {
			fork_after_add = 0;
			fflush(stdout);
			pid_t keeper = fork();
			if (keeper < 0) fail(2, "fork", errno);
			if (keeper == 0) {
				hold_after_end = 1;
				end_session(0);
			}
		}
		if (r.type == SHUTDOWN) {
			event_reason("shutdown", r.text);
			end_session(0);
		}
	}
}
