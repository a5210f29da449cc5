/*
 * wan-delay: holds every packet of an NFQUEUE queue for a fixed time, then accepts it.
 *
 * The packet-level link of the benchmarks (tests/it/link.rs) sends both directions of a
 * veth into one queue, so each packet waits half the round trip; rate limiting is tc's job.
 * This kernel has no netem, hence a program. Built by scripts/setup with Debian's
 * libnetfilter-queue-dev.
 *
 *   wan-delay QUEUE DELAY_US
 *
 * Prints "ready" once the queue is bound. Exits on SIGTERM/SIGINT or when its standard input
 * reaches end of file (the process that started it is gone), so a crashed benchmark leaves
 * no delay program behind.
 *
 * The delay is the same for every packet, so a FIFO ring in arrival order is also in due
 * order. Packets are only meta-copied (no payload) and GSO packets are taken whole, which
 * keeps the work per packet small. Ids that rise in arrival order (the usual case) are
 * released with one batch verdict per wake, which also releases a packet whose notification
 * the socket dropped; otherwise each packet gets its own verdict. The kernel queue is bounded
 * by the ring's size, so the ring never overflows (the kernel drops past it, as a full link
 * buffer would).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define RING 16384 /* a power of two; also the kernel queue's bound */

struct held {
	uint32_t id;
	uint64_t due_ns;
};

static struct held ring[RING];
static uint32_t head, tail; /* head: oldest held; tail: next free */
static uint32_t last_id;
static int rising = 1;
static uint64_t delay_ns, now_ns;
static volatile sig_atomic_t stop;

static uint64_t monotonic_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
		     void *data)
{
	(void)msg;
	(void)data;
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	if (!ph)
		return 0;
	uint32_t id = ntohl(ph->packet_id);
	if (tail - head >= RING) /* cannot happen with the kernel queue bounded; do not stall */
		return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
	if (tail != head && (int32_t)(id - last_id) <= 0)
		rising = 0;
	last_id = id;
	ring[tail % RING] = (struct held){id, now_ns + delay_ns};
	tail++;
	return 0;
}

/* Accepts every held packet that is due. */
static void release(struct nfq_q_handle *qh)
{
	uint64_t now = monotonic_ns();
	uint32_t n = 0, last = 0;
	while (head + n != tail && ring[(head + n) % RING].due_ns <= now) {
		last = ring[(head + n) % RING].id;
		if (!rising)
			nfq_set_verdict(qh, last, NF_ACCEPT, 0, NULL);
		n++;
	}
	if (n && rising)
		nfq_set_verdict_batch(qh, last, NF_ACCEPT);
	head += n;
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: wan-delay QUEUE DELAY_US\n");
		return 2;
	}
	int queue = atoi(argv[1]);
	delay_ns = strtoull(argv[2], NULL, 10) * 1000u;

	struct sigaction sa = {0};
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	/* Timely wake-ups: no timer slack, and a real-time priority when allowed, so the delay
	 * does not grow with the load of the machine the benchmark runs on. */
	prctl(PR_SET_TIMERSLACK, 1UL);
	struct sched_param sp = {.sched_priority = 10};
	if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0)
		fprintf(stderr, "wan-delay: no real-time priority (%s); delays may stretch\n",
			strerror(errno));

	struct nfq_handle *h = nfq_open();
	if (!h) {
		perror("wan-delay: nfq_open");
		return 1;
	}
	struct nfq_q_handle *qh = nfq_create_queue(h, (uint16_t)queue, on_packet, NULL);
	if (!qh) {
		perror("wan-delay: nfq_create_queue");
		return 1;
	}
	if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0 || nfq_set_queue_maxlen(qh, RING) < 0) {
		perror("wan-delay: configuring the queue");
		return 1;
	}
	if (nfq_set_queue_flags(qh, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO) < 0)
		fprintf(stderr, "wan-delay: GSO packets will be segmented\n");
	nfnl_rcvbufsiz(nfq_nfnlh(h), 16 << 20);
	int fd = nfq_fd(h);

	printf("ready\n");
	fflush(stdout);

	char buf[65536];
	struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
	while (!stop) {
		release(qh);
		struct timespec wait, *timeout = NULL;
		if (head != tail) {
			uint64_t due = ring[head % RING].due_ns, now = monotonic_ns();
			uint64_t left = due > now ? due - now : 0;
			wait.tv_sec = (time_t)(left / 1000000000u);
			wait.tv_nsec = (long)(left % 1000000000u);
			timeout = &wait;
		}
		int r = ppoll(fds, 2, timeout, NULL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			perror("wan-delay: ppoll");
			return 1;
		}
		if (fds[1].revents) {
			ssize_t k = read(0, buf, sizeof buf);
			if (k <= 0)
				break; /* the parent is gone */
		}
		if (fds[0].revents & POLLIN) {
			now_ns = monotonic_ns();
			for (;;) {
				ssize_t k = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
				if (k > 0) {
					nfq_handle_packet(h, buf, (int)k);
					continue;
				}
				if (k < 0 && errno == ENOBUFS)
					continue; /* notifications lost; a later batch verdict frees them */
				break;
			}
		}
	}
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}
