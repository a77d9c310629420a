/*
 * Open-loop UDP load generator for bench/bench_rendezvous.py.
 *
 * Python cannot offer a six-figure packet rate and count the answers at the
 * same time, so this does it in C with sendmmsg/recvmmsg on one socket: it
 * sends at a fixed target rate whatever the server does (open loop, so an
 * overloaded server shows up as loss, not as a slower client), and counts
 * the answers that belong to this run.  bench_rendezvous.py compiles it with
 * `cc -O2` into a temporary directory; no binary is ever committed.
 *
 *   loadgen send   --target IP:PORT --rate PPS --duration S [--drain S]
 *                  [--fd N] [--file PATH] --run-id HEX8 --expect TYPE
 *   loadgen reflect --port P --duration S
 *
 * send: Binding requests (transaction id = run id + counter), or the
 * prepared requests in --file (records: u16 big-endian length, bytes),
 * each sent once, in batches as they fall due; between batches it sleeps
 * (at most 1 ms) instead of spinning, so that it costs CPU in proportion to
 * its rate.  A reply counts as answered when its transaction id starts
 * with the run id and its message type is --expect; an error class reply
 * with the run id counts as error.  Prints one JSON line.
 *
 * reflect: a minimal STUN Binding server (XOR-MAPPED-ADDRESS only), to show
 * what the generator itself can drive.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXMSG 1500
#define COOKIE 0x2112A442u

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen send --target IP:PORT --rate PPS --duration S "
                    "[--drain S] [--fd N] [--file PATH] --run-id HEX8 --expect TYPE\n"
                    "       loadgen reflect --port P --duration S\n");
    exit(2);
}

static int parse_target(const char *text, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || colon - text >= (long)sizeof host) return -1;
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

/* Prepared requests: pointers into one buffer. */
struct records {
    unsigned char *data;
    unsigned char **msg;
    uint16_t *len;
    size_t count;
};

static void load_records(const char *path, struct records *r) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    if (fseek(f, 0, SEEK_END) != 0) die("fseek");
    long size = ftell(f);
    rewind(f);
    r->data = malloc(size > 0 ? size : 1);
    if (!r->data || fread(r->data, 1, size, f) != (size_t)size) die("read records");
    fclose(f);
    size_t n = 0;
    for (long pos = 0; pos + 2 <= size; n++) pos += 2 + ((r->data[pos] << 8) | r->data[pos + 1]);
    r->msg = malloc(n * sizeof *r->msg + 1);
    r->len = malloc(n * sizeof *r->len + 1);
    if (!r->msg || !r->len) die("malloc");
    long pos = 0;
    for (size_t i = 0; i < n; i++) {
        r->len[i] = (uint16_t)((r->data[pos] << 8) | r->data[pos + 1]);
        r->msg[i] = r->data + pos + 2;
        pos += 2 + r->len[i];
        if (pos > size) {
            fprintf(stderr, "truncated record file\n");
            exit(2);
        }
    }
    r->count = n;
}

static void big_buffers(int fd) {
    int size = 8 << 20;
    /* FORCE needs CAP_NET_ADMIN; the plain one is capped by rmem_max. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

struct counts {
    uint64_t answered, errors, other;
};

static unsigned char rbuf[BATCH][MAXMSG];

/* Read what is queued (up to `rounds` batches); returns datagrams read. */
static int drain(int fd, const unsigned char run_id[4], unsigned expect, struct counts *c,
                 int rounds, int flags) {
    struct mmsghdr hdr[BATCH];
    struct iovec iov[BATCH];
    int total = 0;
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = rbuf[i];
            iov[i].iov_len = MAXMSG;
            memset(&hdr[i].msg_hdr, 0, sizeof hdr[i].msg_hdr);
            hdr[i].msg_hdr.msg_iov = &iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, hdr, BATCH, flags, NULL);
        if (n <= 0) break;
        for (int i = 0; i < n; i++) {
            const unsigned char *m = rbuf[i];
            if (hdr[i].msg_len < 20 || memcmp(m + 8, run_id, 4) != 0) {
                c->other++;
                continue;
            }
            unsigned type = (m[0] << 8) | m[1];
            if (type == expect)
                c->answered++;
            else if ((type & 0x0110) == 0x0110)
                c->errors++;
            else
                c->other++;
        }
        total += n;
        flags |= MSG_DONTWAIT;
        if (n < BATCH) break;
    }
    return total;
}

static int cmd_send(int argc, char **argv) {
    const char *target = NULL, *file = NULL, *run_hex = NULL;
    double rate = 0, duration = 0, drain_s = 0.5;
    unsigned expect = 0x0101;
    int fd = -1;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--target")) target = argv[i + 1];
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--drain")) drain_s = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--fd")) fd = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--file")) file = argv[i + 1];
        else if (!strcmp(argv[i], "--run-id")) run_hex = argv[i + 1];
        else if (!strcmp(argv[i], "--expect")) expect = (unsigned)strtoul(argv[i + 1], NULL, 0);
        else usage();
    }
    if (!target || !run_hex || rate <= 0 || duration <= 0 || strlen(run_hex) != 8) usage();
    unsigned char run_id[4];
    for (int i = 0; i < 4; i++) {
        unsigned byte;
        if (sscanf(run_hex + 2 * i, "%2x", &byte) != 1) usage();
        run_id[i] = (unsigned char)byte;
    }
    struct sockaddr_in server;
    if (parse_target(target, &server) != 0) usage();
    if (fd < 0) {
        fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
    }
    big_buffers(fd);
    if (connect(fd, (struct sockaddr *)&server, sizeof server) != 0) die("connect");

    struct records rec = {0};
    uint64_t total = (uint64_t)(rate * duration);
    if (file) {
        load_records(file, &rec);
        if (rec.count < total) total = rec.count;
    }
    /* Binding requests: header only, transaction id = run id + 64-bit counter. */
    static unsigned char bind[BATCH][20];
    struct mmsghdr hdr[BATCH];
    struct iovec iov[BATCH];
    struct counts c = {0, 0, 0};
    uint64_t sent = 0, send_errors = 0;
    double start = now(), limit = start + duration * 2 + 5;
    while (sent < total) {
        double t = now();
        if (t > limit) break; /* bounded even if sends keep failing */
        uint64_t due = (uint64_t)((t - start) * rate);
        if (due > total) due = total;
        if (due > sent) {
            int n = (int)(due - sent < BATCH ? due - sent : BATCH);
            for (int i = 0; i < n; i++) {
                memset(&hdr[i].msg_hdr, 0, sizeof hdr[i].msg_hdr);
                if (file) {
                    iov[i].iov_base = rec.msg[sent + i];
                    iov[i].iov_len = rec.len[sent + i];
                } else {
                    unsigned char *m = bind[i];
                    uint64_t k = sent + i;
                    m[0] = 0; m[1] = 1; m[2] = 0; m[3] = 0;
                    m[4] = 0x21; m[5] = 0x12; m[6] = 0xA4; m[7] = 0x42;
                    memcpy(m + 8, run_id, 4);
                    for (int b = 0; b < 8; b++) m[12 + b] = (unsigned char)(k >> (56 - 8 * b));
                    iov[i].iov_base = m;
                    iov[i].iov_len = 20;
                }
                hdr[i].msg_hdr.msg_iov = &iov[i];
                hdr[i].msg_hdr.msg_iovlen = 1;
            }
            int done = sendmmsg(fd, hdr, n, MSG_DONTWAIT);
            if (done > 0) {
                sent += done;
            } else if (done < 0 && errno != EAGAIN && errno != ENOBUFS &&
                       errno != ECONNREFUSED) {
                die("sendmmsg");
            } else {
                send_errors++;
            }
        }
        drain(fd, run_id, expect, &c, 4, MSG_DONTWAIT);
        /* Nothing more due: sleep (waking for answers) until a batch is due,
         * at most 1 ms.  A spinning generator takes a whole core, which on a
         * two-core machine is the core the servers under test needed. */
        uint64_t next = sent + BATCH < total ? sent + BATCH : total;
        double wait = start + next / rate - now();
        if (sent < total && (uint64_t)((now() - start) * rate) <= sent && wait > 0) {
            if (wait > 0.001) wait = 0.001;
            struct timespec ts = {0, (long)(wait * 1e9)};
            struct pollfd p = {fd, POLLIN, 0};
            ppoll(&p, 1, &ts, NULL);
        }
    }
    double send_end = now();
    /* Late answers: keep reading until none came for drain_s. */
    double quiet_since = now();
    while (now() - quiet_since < drain_s && now() < limit + drain_s) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 10) > 0 && drain(fd, run_id, expect, &c, 64, MSG_DONTWAIT) > 0)
            quiet_since = now();
    }
    printf("{\"target_rate\": %.0f, \"sent\": %llu, \"answered\": %llu, \"errors\": %llu, "
           "\"other\": %llu, \"send_errors\": %llu, \"send_seconds\": %.6f}\n",
           rate, (unsigned long long)sent, (unsigned long long)c.answered,
           (unsigned long long)c.errors, (unsigned long long)c.other,
           (unsigned long long)send_errors, send_end - start);
    return 0;
}

static int cmd_reflect(int argc, char **argv) {
    int port = 0;
    double duration = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else usage();
    }
    if (port <= 0 || duration <= 0) usage();
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    big_buffers(fd);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) die("bind");
    static unsigned char in[BATCH][MAXMSG], out[BATCH][32];
    struct sockaddr_in from[BATCH];
    struct mmsghdr rh[BATCH], sh[BATCH];
    struct iovec riov[BATCH], siov[BATCH];
    uint64_t answered = 0;
    double end = now() + duration;
    while (now() < end) {
        for (int i = 0; i < BATCH; i++) {
            riov[i].iov_base = in[i];
            riov[i].iov_len = MAXMSG;
            memset(&rh[i].msg_hdr, 0, sizeof rh[i].msg_hdr);
            rh[i].msg_hdr.msg_iov = &riov[i];
            rh[i].msg_hdr.msg_iovlen = 1;
            rh[i].msg_hdr.msg_name = &from[i];
            rh[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0) continue;
        int n = recvmmsg(fd, rh, BATCH, MSG_DONTWAIT, NULL);
        int k = 0;
        for (int i = 0; i < n; i++) {
            const unsigned char *m = in[i];
            if (rh[i].msg_len < 20 || m[0] != 0 || m[1] != 1) continue;
            unsigned char *o = out[k];
            uint32_t xaddr = ntohl(from[i].sin_addr.s_addr) ^ COOKIE;
            uint16_t xport = ntohs(from[i].sin_port) ^ (COOKIE >> 16);
            o[0] = 0x01; o[1] = 0x01; o[2] = 0; o[3] = 12;
            memcpy(o + 4, m + 4, 16);
            o[20] = 0; o[21] = 0x20; o[22] = 0; o[23] = 8;
            o[24] = 0; o[25] = 1; o[26] = xport >> 8; o[27] = xport & 0xFF;
            o[28] = xaddr >> 24; o[29] = (xaddr >> 16) & 0xFF;
            o[30] = (xaddr >> 8) & 0xFF; o[31] = xaddr & 0xFF;
            siov[k].iov_base = o;
            siov[k].iov_len = 32;
            memset(&sh[k].msg_hdr, 0, sizeof sh[k].msg_hdr);
            sh[k].msg_hdr.msg_iov = &siov[k];
            sh[k].msg_hdr.msg_iovlen = 1;
            sh[k].msg_hdr.msg_name = &from[i];
            sh[k].msg_hdr.msg_namelen = sizeof from[i];
            k++;
        }
        if (k > 0) {
            int done = sendmmsg(fd, sh, k, 0);
            if (done > 0) answered += done;
        }
    }
    printf("{\"reflected\": %llu}\n", (unsigned long long)answered);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(argv[1], "send")) return cmd_send(argc, argv);
    if (!strcmp(argv[1], "reflect")) return cmd_reflect(argc, argv);
    usage();
    return 2;
}
