/*
 * The raw path of a VM launch, as a VMM running as root would do it without
 * kvmvfiod: KVM_CREATE_VM, KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO) and one
 * KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE_ADD), timed here in C with
 * CLOCK_MONOTONIC, so no interpreter or IPC is in the number.
 *
 * This host has no VFIO group to add: the ADD is given an fd of /dev/null and
 * the kernel answers EINVAL after the same fd lookup and type check a real
 * ADD starts with (a real ADD then links the group to the KVM, a few µs more).
 * The call is timed anyway and its errno reported, so the reader can see it.
 *
 * Teardown (closing the device fd waits for an RCU grace period, ~14 ms here)
 * is never in the launch. In serve mode it is deferred: "flush" closes every
 * VM launched so far from up to 64 threads at once (concurrent closes share
 * grace periods), so launches can run back to back, as a busy host does.
 *
 *   raw_launch serve   stdin line "go": one launch, answered "ok TOTAL_NS VM_NS DEVICE_NS ATTR_NS ATTR_ERRNO";
 *                      "flush": closes the VMs launched so far, answered "flushed N MS"
 *   raw_launch N       N launches on its own, each closed at once; prints medians and p99 (by hand)
 *
 * gcc -O2 -Wall -pthread -o raw_launch raw_launch.c   (run as root: it opens /dev/kvm)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* Older headers (Debian 12's 6.1) name these after groups; the values are the same. */
#ifndef KVM_DEV_VFIO_FILE
#define KVM_DEV_VFIO_FILE KVM_DEV_VFIO_GROUP
#endif
#ifndef KVM_DEV_VFIO_FILE_ADD
#define KVM_DEV_VFIO_FILE_ADD KVM_DEV_VFIO_GROUP_ADD
#endif

struct launch {
  uint64_t total, vm, device, attr, teardown;
  int attr_errno;
  int vm_fd, device_fd;
};

static int kvm_fd = -1, null_fd = -1;

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "raw_launch: %s: %s\n", what, strerror(errno));
  exit(1);
}

/* The timed part; the caller closes r.device_fd and r.vm_fd. */
static struct launch launch_once(void) {
  struct launch r = {0};
  int32_t file_fd = null_fd;
  struct kvm_create_device cd = {.type = KVM_DEV_TYPE_VFIO, .fd = 0, .flags = 0};
  struct kvm_device_attr attr = {
      .flags = 0, .group = KVM_DEV_VFIO_FILE, .attr = KVM_DEV_VFIO_FILE_ADD, .addr = (uint64_t)(uintptr_t)&file_fd};

  uint64_t t0 = now_ns();
  int vm = ioctl(kvm_fd, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  uint64_t t1 = now_ns();
  if (ioctl(vm, KVM_CREATE_DEVICE, &cd) < 0) die("KVM_CREATE_DEVICE(VFIO)");
  uint64_t t2 = now_ns();
  int rc = ioctl((int)cd.fd, KVM_SET_DEVICE_ATTR, &attr);
  int err = rc < 0 ? errno : 0;
  uint64_t t3 = now_ns();

  r.total = t3 - t0;
  r.vm = t1 - t0;
  r.device = t2 - t1;
  r.attr = t3 - t2;
  r.attr_errno = err;
  r.vm_fd = vm;
  r.device_fd = (int)cd.fd;
  return r;
}

static void close_launch(struct launch *r) {
  close(r->device_fd); /* waits for an RCU grace period */
  close(r->vm_fd);
}

/* VMs launched in serve mode and not yet closed. */
#define MAX_HELD 4096
#define CLOSERS 64
static struct launch held[MAX_HELD];
static size_t nheld;

struct slice {
  size_t from, to;
};

static void *closer(void *arg) {
  struct slice *s = arg;
  for (size_t i = s->from; i < s->to; i++) close_launch(&held[i]);
  return NULL;
}

/* Closes every held VM from up to CLOSERS threads; returns the ms it took. */
static double flush_held(void) {
  uint64_t t0 = now_ns();
  pthread_t th[CLOSERS];
  struct slice sl[CLOSERS];
  size_t nt = nheld < CLOSERS ? nheld : CLOSERS;
  for (size_t t = 0; t < nt; t++) {
    sl[t].from = nheld * t / nt;
    sl[t].to = nheld * (t + 1) / nt;
    if (pthread_create(&th[t], NULL, closer, &sl[t]) != 0) {
      errno = EAGAIN;
      die("pthread_create");
    }
  }
  for (size_t t = 0; t < nt; t++) pthread_join(th[t], NULL);
  nheld = 0;
  return (double)(now_ns() - t0) / 1e6;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Nearest rank, as bench/stats.ts. */
static uint64_t pct(uint64_t *v, size_t n, double q) {
  qsort(v, n, sizeof *v, cmp_u64);
  size_t k = (size_t)(q * (double)n + 0.999999);
  if (k < 1) k = 1;
  if (k > n) k = n;
  return v[k - 1];
}

static int standalone(long n) {
  uint64_t *cols[5];
  const char *names[5] = {"total", "KVM_CREATE_VM", "KVM_CREATE_DEVICE", "KVM_SET_DEVICE_ATTR", "teardown"};
  for (int c = 0; c < 5; c++)
    if (!(cols[c] = calloc((size_t)n, sizeof(uint64_t)))) die("calloc");
  int errno_seen = 0;
  for (long i = 0; i < n; i++) {
    struct launch r = launch_once();
    uint64_t t = now_ns();
    close_launch(&r);
    r.teardown = now_ns() - t;
    cols[0][i] = r.total;
    cols[1][i] = r.vm;
    cols[2][i] = r.device;
    cols[3][i] = r.attr;
    cols[4][i] = r.teardown;
    errno_seen = r.attr_errno;
  }
  for (int c = 0; c < 5; c++)
    printf("%-22s median %8.1f us   p99 %8.1f us\n", names[c], pct(cols[c], (size_t)n, 0.5) / 1e3,
           pct(cols[c], (size_t)n, 0.99) / 1e3);
  printf("KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD, /dev/null fd) errno: %d (%s)\n", errno_seen, strerror(errno_seen));
  return 0;
}

static int serve(void) {
  char line[64];
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("ready\n");
  while (fgets(line, sizeof line, stdin)) {
    if (strncmp(line, "flush", 5) == 0) {
      size_t n = nheld;
      printf("flushed %zu %.1f\n", n, flush_held());
      continue;
    }
    if (strncmp(line, "go", 2) != 0) {
      printf("error unknown command\n");
      continue;
    }
    if (nheld == MAX_HELD) {
      printf("error %d VMs held; flush first\n", MAX_HELD);
      continue;
    }
    struct launch r = launch_once();
    held[nheld++] = r;
    printf("ok %llu %llu %llu %llu %d\n", (unsigned long long)r.total, (unsigned long long)r.vm,
           (unsigned long long)r.device, (unsigned long long)r.attr, r.attr_errno);
  }
  flush_held();
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: raw_launch serve | raw_launch N\n");
    return 2;
  }
  kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm_fd < 0) die("open /dev/kvm");
  null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd < 0) die("open /dev/null");
  if (strcmp(argv[1], "serve") == 0) return serve();
  long n = strtol(argv[1], NULL, 10);
  if (n < 1) {
    fprintf(stderr, "raw_launch: N must be a positive number\n");
    return 2;
  }
  return standalone(n);
}
