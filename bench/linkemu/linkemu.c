/* linkemu: an emulated wide-area link between two network namespaces.
 *
 * This kernel has no netem qdisc, so the link lives in user space: linkemu creates one TUN
 * device in each namespace and forwards the raw IP packets that one side's stack routes into
 * its device out of the other side's device. Both TCP stacks are real and see the real round
 * trip; nothing is terminated or re-sent here. Each direction is its own link:
 *
 *   loss   a packet is dropped at random with probability LOSS before it is queued;
 *   queue  drop-tail when the bytes still waiting to be serialised would exceed QUEUE_BYTES
 *          (default: one bandwidth-delay product, RATE x 2 x DELAY, at least 64 KiB);
 *   rate   a virtual clock paces departures: departure = max(now, last departure) + size/RATE;
 *   delay  the packet is written out DELAY ms after its departure.
 *
 * Departures are monotonic and the delay is constant, so each direction is one FIFO ordered
 * by arrival time. One thread waits on both TUN fds, a timerfd set to the earliest arrival
 * and a signalfd (SIGTERM/SIGINT): it prints READY once both devices exist and, on exit, one
 * JSON line of per-direction counters. The devices vanish with the process.
 *
 *   linkemu --ns-a NS --dev-a DEV --ns-b NS --dev-b DEV --delay-ms D --rate-mbit R
 *           [--loss P] [--queue-bytes N] [--seed S]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SLOT_BYTES 2048 /* larger than the devices' MTU (1500, the TUN default) */

struct packet {
    double arrival; /* monotonic seconds at which it leaves the far end of the link */
    uint32_t length;
    unsigned char data[SLOT_BYTES];
};

struct direction {
    const char *name;
    int in, out;            /* read packets from `in`, write them to `out` (TUN fds) */
    struct packet *ring;    /* FIFO of packets on the link, ordered by arrival */
    size_t slots, head, count;
    double last_departure;  /* virtual clock: when the link finishes serialising the last packet */
    uint64_t packets, bytes, lost, queue_drops, ring_drops, write_errors, max_backlog;
};

struct link {
    double delay_s, rate_bytes_per_s, loss;
    uint64_t queue_bytes, rng;
};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* splitmix64: a seeded, reproducible uniform draw in [0, 1) for the loss decision. */
static double uniform(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

/* Enter the named namespace (from `ip netns add`) and create DEV there, so the device is born in it. */
static int open_tun(const char *ns, const char *dev) {
    char path[256];
    snprintf(path, sizeof path, "/var/run/netns/%s", ns);
    int nsfd = open(path, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) die(path);
    if (setns(nsfd, CLONE_NEWNET) < 0) die("setns");
    close(nsfd);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr = {0};
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    return fd;
}

/* Take one packet read from the link's near end: lose it, drop it, or schedule its arrival. */
static void admit(struct direction *d, struct link *l, size_t length, double t) {
    double start = d->last_departure > t ? d->last_departure : t;
    uint64_t backlog = (uint64_t)((start - t) * l->rate_bytes_per_s); /* bytes not yet serialised */
    if (l->loss > 0 && uniform(&l->rng) < l->loss) { d->lost++; return; }
    if (d->count == d->slots) { d->ring_drops++; return; }
    if (backlog + length > l->queue_bytes) { d->queue_drops++; return; }
    struct packet *p = &d->ring[(d->head + d->count) % d->slots];
    d->last_departure = start + (double)length / l->rate_bytes_per_s;
    p->arrival = d->last_departure + l->delay_s;
    p->length = (uint32_t)length;
    d->count++;
    d->packets++;
    d->bytes += length;
    if (backlog + length > d->max_backlog) d->max_backlog = backlog + length;
}

/* Read every packet waiting on the near end, straight into the ring's next free slot. */
static void drain(struct direction *d, struct link *l) {
    static unsigned char spill[SLOT_BYTES]; /* where a packet goes when the ring is full */
    for (;;) {
        int full = d->count == d->slots;
        unsigned char *into = full ? spill : d->ring[(d->head + d->count) % d->slots].data;
        ssize_t n = read(d->in, into, SLOT_BYTES);
        if (n < 0 && errno == EAGAIN) return;
        if (n < 0) die("read");
        admit(d, l, (size_t)n, now());
    }
}

/* Write out every packet whose arrival time has come; returns the next arrival (0 if none). */
static double deliver(struct direction *d, double t) {
    while (d->count && d->ring[d->head].arrival <= t) {
        struct packet *p = &d->ring[d->head];
        if (write(d->out, p->data, p->length) < 0) d->write_errors++;
        d->head = (d->head + 1) % d->slots;
        d->count--;
    }
    return d->count ? d->ring[d->head].arrival : 0.0;
}

/* Set the timer to the earliest pending arrival of either direction (0: none) unless already set. */
static void arm(int timer, double *armed, double next_a, double next_b) {
    double next = next_a && next_b ? (next_a < next_b ? next_a : next_b) : (next_a ? next_a : next_b);
    if (next == *armed) return;
    struct itimerspec when = {0}; /* all zero disarms */
    when.it_value.tv_sec = (time_t)next;
    when.it_value.tv_nsec = (long)((next - (double)(time_t)next) * 1e9);
    if (timerfd_settime(timer, TFD_TIMER_ABSTIME, &when, NULL) < 0) die("timerfd_settime");
    *armed = next;
}

static void report(const struct direction *d, const char *tail) {
    printf("\"%s\": {\"packets\": %llu, \"bytes\": %llu, \"lost\": %llu, \"queue_drops\": %llu, "
           "\"ring_drops\": %llu, \"write_errors\": %llu, \"max_backlog_bytes\": %llu}%s",
           d->name, (unsigned long long)d->packets, (unsigned long long)d->bytes, (unsigned long long)d->lost,
           (unsigned long long)d->queue_drops, (unsigned long long)d->ring_drops,
           (unsigned long long)d->write_errors, (unsigned long long)d->max_backlog, tail);
}

static void usage(const char *program) {
    fprintf(stderr, "usage: %s --ns-a NS --dev-a DEV --ns-b NS --dev-b DEV --delay-ms D --rate-mbit R "
                    "[--loss P] [--queue-bytes N] [--seed S]\n", program);
    exit(2);
}

int main(int argc, char **argv) {
    const char *ns_a = NULL, *dev_a = NULL, *ns_b = NULL, *dev_b = NULL;
    double delay_ms = -1, rate_mbit = 0, loss = 0, queue_bytes = 0;
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    static const struct option options[] = {
        {"ns-a", 1, 0, 'a'}, {"dev-a", 1, 0, 'A'}, {"ns-b", 1, 0, 'b'}, {"dev-b", 1, 0, 'B'},
        {"delay-ms", 1, 0, 'd'}, {"rate-mbit", 1, 0, 'r'}, {"loss", 1, 0, 'l'},
        {"queue-bytes", 1, 0, 'q'}, {"seed", 1, 0, 's'}, {0, 0, 0, 0}};
    for (int c; (c = getopt_long(argc, argv, "", options, NULL)) != -1;) {
        switch (c) {
        case 'a': ns_a = optarg; break;
        case 'A': dev_a = optarg; break;
        case 'b': ns_b = optarg; break;
        case 'B': dev_b = optarg; break;
        case 'd': delay_ms = atof(optarg); break;
        case 'r': rate_mbit = atof(optarg); break;
        case 'l': loss = atof(optarg); break;
        case 'q': queue_bytes = atof(optarg); break;
        case 's': seed = strtoull(optarg, NULL, 10); break;
        default: usage(argv[0]);
        }
    }
    if (!ns_a || !dev_a || !ns_b || !dev_b || delay_ms < 0 || rate_mbit <= 0 || loss < 0 || loss >= 1) usage(argv[0]);

    struct link link = {delay_ms / 1e3, rate_mbit * 1e6 / 8, loss, 0, seed};
    double in_flight = link.rate_bytes_per_s * link.delay_s;
    double bdp = 2 * in_flight > 64 * 1024 ? 2 * in_flight : 64 * 1024; /* a floor for tiny delays */
    link.queue_bytes = (uint64_t)(queue_bytes > 0 ? queue_bytes : bdp);
    int fd_a = open_tun(ns_a, dev_a), fd_b = open_tun(ns_b, dev_b);
    struct direction dirs[2] = {{.name = "a_to_b", .in = fd_a, .out = fd_b},
                                {.name = "b_to_a", .in = fd_b, .out = fd_a}};
    for (int k = 0; k < 2; k++) { /* room for the queue and the wire at 1 KiB per packet on average */
        dirs[k].slots = (size_t)((double)link.queue_bytes + in_flight) / 1024 + 1024;
        dirs[k].ring = malloc(dirs[k].slots * sizeof(struct packet)); /* pages are touched only when used */
        if (!dirs[k].ring) die("malloc");
    }

    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    if (sigprocmask(SIG_BLOCK, &stop_signals, NULL) < 0) die("sigprocmask");
    int signals = signalfd(-1, &stop_signals, SFD_CLOEXEC);
    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    int poller = epoll_create1(EPOLL_CLOEXEC);
    if (signals < 0 || timer < 0 || poller < 0) die("signalfd/timerfd/epoll");
    int watched[4] = {fd_a, fd_b, timer, signals};
    for (int k = 0; k < 4; k++) {
        struct epoll_event event = {.events = EPOLLIN, .data.fd = watched[k]};
        if (epoll_ctl(poller, EPOLL_CTL_ADD, watched[k], &event) < 0) die("epoll_ctl");
    }
    printf("READY\n");
    fflush(stdout);

    double armed = 0.0; /* the timer's deadline; -1 once it has fired */
    for (int running = 1; running;) {
        struct epoll_event events[4];
        int n = epoll_wait(poller, events, 4, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd == fd_a) drain(&dirs[0], &link);
            else if (fd == fd_b) drain(&dirs[1], &link);
            else if (fd == signals) running = 0;
            else {
                uint64_t expirations;
                (void)!read(timer, &expirations, sizeof expirations);
                armed = -1;
            }
        }
        double t = now();
        arm(timer, &armed, deliver(&dirs[0], t), deliver(&dirs[1], t));
    }
    printf("{");
    report(&dirs[0], ", ");
    report(&dirs[1], "}\n");
    fflush(stdout);
    return 0;
}
