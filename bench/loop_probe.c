/*
 * Watches kvmvfiod's event loop from outside. It attaches to the handoff
 * socket with a token, as a VMM would (docs/session-protocol.md), never sends
 * VM_CREATED, and then sends a PING record every INTERVAL_US. The daemon
 * answers a PING synchronously in the uv_poll callback of the session, so a
 * PING's round trip is the wait for the daemon's event loop to come round to
 * it, plus two process wake-ups (~10-60 µs here). It is plain blocking C,
 * with no event loop of its own to add noise.
 *
 * On a busy 2-core host a round trip also holds any time the daemon waited
 * for a CPU (run-queue delay), which no in-process histogram sees either.
 *
 *   loop_probe HANDOFF_SOCKET TOKEN INTERVAL_US
 *
 * Prints "attached" once attached. stdin: a line "report" prints one JSON
 * line with the round trips since the previous report and starts afresh;
 * end of file ends the probe.
 *
 * gcc -O2 -Wall -o loop_probe loop_probe.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define KVF_MAGIC 0x3146564bu
#define KVF_ATTACH 1
#define KVF_PING 3
#define KVF_RESULT 0x8000
#define MAX_RECORD 4096
#define REPLY_TIMEOUT_MS 5000

struct kvf_hdr {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t seq;
  int32_t status;
  uint64_t arg;
  uint16_t nfds;
  uint16_t text_len;
  uint32_t reserved;
} __attribute__((packed));

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "loop_probe: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int sock = -1;

static void send_record(uint16_t type, uint32_t seq, const char *text) {
  unsigned char buf[MAX_RECORD];
  size_t tl = text ? strlen(text) : 0;
  if (sizeof(struct kvf_hdr) + tl > MAX_RECORD) {
    errno = EMSGSIZE;
    die("record too long");
  }
  struct kvf_hdr h = {.magic = KVF_MAGIC, .version = 1, .type = type, .seq = seq, .text_len = (uint16_t)tl};
  memcpy(buf, &h, sizeof h);
  if (tl) memcpy(buf + sizeof h, text, tl);
  if (send(sock, buf, sizeof h + tl, MSG_NOSIGNAL) < 0) die("send");
}

/* One record; fds that come with it are closed (the probe needs none). 0 on end of stream. */
static ssize_t recv_record(struct kvf_hdr *out) {
  unsigned char buf[MAX_RECORD];
  union {
    struct cmsghdr align;
    char space[CMSG_SPACE(8 * sizeof(int))];
  } ctl;
  struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.space, .msg_controllen = sizeof ctl.space};
  ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
  if (n < 0) die("recvmsg");
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      int fds[8];
      memcpy(fds, CMSG_DATA(c), (size_t)nfd * sizeof(int));
      for (int i = 0; i < nfd; i++) close(fds[i]);
    }
  }
  if (n == 0) return 0;
  if ((size_t)n < sizeof *out) {
    fprintf(stderr, "loop_probe: short record (%zd bytes)\n", n);
    exit(1);
  }
  memcpy(out, buf, sizeof *out);
  return n;
}

/* Round trips since the last report, in ns. */
static uint64_t *rtt;
static size_t nrtt, caprtt;
static unsigned long timeouts;

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static double pct_us(double q) {
  if (!nrtt) return 0;
  size_t k = (size_t)(q * (double)nrtt + 0.999999);
  if (k < 1) k = 1;
  if (k > nrtt) k = nrtt;
  return (double)rtt[k - 1] / 1e3;
}

static void report(void) {
  qsort(rtt, nrtt, sizeof *rtt, cmp_u64);
  size_t over5 = 0, over1 = 0;
  for (size_t i = 0; i < nrtt; i++) {
    if (rtt[i] > 5000000) over5++;
    if (rtt[i] > 1000000) over1++;
  }
  printf("{\"n\":%zu,\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,\"over_1ms\":%zu,\"over_5ms\":%zu,"
         "\"timeouts\":%lu}\n",
         nrtt, pct_us(0.5), pct_us(0.99), pct_us(0.999), nrtt ? (double)rtt[nrtt - 1] / 1e3 : 0.0, over1, over5,
         timeouts);
  fflush(stdout);
  nrtt = 0;
  timeouts = 0;
}

static void keep(uint64_t ns) {
  if (nrtt == caprtt) {
    caprtt = caprtt ? caprtt * 2 : 65536;
    if (!(rtt = realloc(rtt, caprtt * sizeof *rtt))) die("realloc");
  }
  rtt[nrtt++] = ns;
}

/* Handles stdin if it has a line; returns 0 at end of file. */
static int read_command(void) {
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 0;
  if (strncmp(line, "report", 6) == 0) report();
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: loop_probe HANDOFF_SOCKET TOKEN INTERVAL_US\n");
    return 2;
  }
  long interval_us = strtol(argv[3], NULL, 10);
  if (interval_us < 100) interval_us = 100;
  setvbuf(stdin, NULL, _IONBF, 0);

  sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (sock < 0) die("socket");
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(argv[1]) >= sizeof sa.sun_path) {
    errno = ENAMETOOLONG;
    die(argv[1]);
  }
  strcpy(sa.sun_path, argv[1]);
  if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");

  struct kvf_hdr h;
  send_record(KVF_ATTACH, 1, argv[2]);
  if (recv_record(&h) == 0) {
    fprintf(stderr, "loop_probe: the daemon closed the session during ATTACH\n");
    return 1;
  }
  if (h.type != (KVF_ATTACH | KVF_RESULT) || h.status != 0) {
    fprintf(stderr, "loop_probe: ATTACH refused (type 0x%x, errno %d)\n", h.type, h.status);
    return 1;
  }
  printf("attached\n");
  fflush(stdout);

  uint32_t seq = 1;
  uint64_t next = now_ns();
  for (;;) {
    uint64_t t = now_ns();
    int wait_ms = t >= next ? 0 : (int)((next - t + 999999) / 1000000);
    struct pollfd in = {.fd = 0, .events = POLLIN};
    /* Sub-millisecond waits: poll's timeout is in ms, so sleep the remainder precisely. */
    if (wait_ms <= 1 && t < next) {
      struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(next - t)};
      nanosleep(&ts, NULL);
      wait_ms = 0;
    }
    int pr = poll(&in, 1, wait_ms);
    if (pr < 0 && errno != EINTR) die("poll");
    if (pr > 0 && !read_command()) break;
    if (now_ns() < next) continue;

    uint32_t my = ++seq;
    uint64_t sent = now_ns();
    send_record(KVF_PING, my, NULL);
    for (;;) {
      struct pollfd ps = {.fd = sock, .events = POLLIN};
      int r = poll(&ps, 1, REPLY_TIMEOUT_MS);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) die("poll");
      if (r == 0) {
        timeouts++;
        break;
      }
      if (recv_record(&h) == 0) {
        fprintf(stderr, "loop_probe: the daemon closed the session\n");
        report();
        return 0;
      }
      if (h.type == (KVF_PING | KVF_RESULT) && h.seq == my) {
        keep(now_ns() - sent);
        break;
      }
      /* Anything else (a late result, a request the probe does not serve): ignore it. */
    }
    next = sent + (uint64_t)interval_us * 1000u;
  }
  return 0;
}
