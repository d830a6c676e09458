/* sink: the benchmark's receiving side: counts packets and bytes with recvmmsg.

     --udp ADDR:PORT [--reflect]   a UDP socket (IPv4 or IPv6 address): the service the gateway
                                   forwards to. With --reflect it also sends every datagram
                                   straight back to its source with sendmmsg (the return path).
     --packet IFNAME --family 4|6 --proto N [--synack]
                                   an AF_PACKET socket on IFNAME that sees arriving IPv4 or IPv6
                                   packets of IP protocol N (outgoing ones ignored): the tunnel
                                   side's counter. With --synack only TCP SYN+ACK segments count
                                   (inside protocol 41 when N is 41). The kernel may drop the
                                   packets after we saw them: an nftables rule does, so no
                                   socket-less host answers them.
     --tcp-listen ADDR:PORT        a TCP listener with a deep backlog that never accepts: the
                                   kernel answers every SYN with a SYN+ACK (syncookies once the
                                   queue is full).

   The counters live in --counters FILE (mmap'd, 8 little-endian u64: packets, bytes, other,
   reflected, reflect_errors, ready, 0, 0) so the harness reads them at any time without a
   syscall on our side. Runs until SIGTERM. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 256
#define BUFFER 2048
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

enum { PACKETS, BYTES, OTHER, REFLECTED, REFLECT_ERRORS, READY, COUNTERS = 8 };

static void die(const char *what) { perror(what); exit(2); }

static void usage(void) {
    fprintf(stderr, "usage: sink --counters FILE (--udp ADDR:PORT [--reflect] | --packet IFNAME "
                    "--family 4|6 --proto N [--synack] | --tcp-listen ADDR:PORT)\n");
    exit(2);
}

static socklen_t parse_endpoint(const char *text, struct sockaddr_storage *out) {
    char host[128];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) usage();
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    char *h = host;
    if (h[0] == '[') { h++; h[strlen(h) - 1] = 0; }
    uint16_t port = htons((uint16_t)atoi(colon + 1));
    memset(out, 0, sizeof *out);
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, h, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = port;
        return sizeof *v4;
    }
    if (inet_pton(AF_INET6, h, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = port;
        return sizeof *v6;
    }
    usage();
    return 0;
}

static void big_buffer(int fd) {
    int size = 64 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

/* Does this packet (network layer first) match --proto / --synack? */
static int matches(const uint8_t *p, size_t len, int family, int proto, int synack) {
    size_t at;
    int next;
    if (family == 4) {
        if (len < 20 || p[0] >> 4 != 4) return 0;
        next = p[9];
        at = (size_t)(p[0] & 15) * 4;
    } else {
        if (len < 40 || p[0] >> 4 != 6) return 0;
        next = p[6];
        at = 40;
    }
    if (next != proto) return 0;
    if (!synack) return 1;
    if (next == 41) { /* 6in4: look at the inner IPv6 packet */
        if (len < at + 40 || p[at] >> 4 != 6) return 0;
        next = p[at + 6];
        at += 40;
    }
    return next == IPPROTO_TCP && len >= at + 14 && (p[at + 13] & 0x12) == 0x12;
}

int main(int argc, char **argv) {
    const char *counters_path = NULL, *udp = NULL, *ifname = NULL, *listen_at = NULL;
    int reflect = 0, family = 4, proto = -1, synack = 0;
    static struct option options[] = {
        {"counters", 1, 0, 'c'}, {"udp", 1, 0, 'u'}, {"reflect", 0, 0, 'r'},
        {"packet", 1, 0, 'p'}, {"family", 1, 0, 'f'}, {"proto", 1, 0, 'P'},
        {"synack", 0, 0, 's'}, {"tcp-listen", 1, 0, 'l'}, {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'c': counters_path = optarg; break;
        case 'u': udp = optarg; break;
        case 'r': reflect = 1; break;
        case 'p': ifname = optarg; break;
        case 'f': family = atoi(optarg); break;
        case 'P': proto = atoi(optarg); break;
        case 's': synack = 1; break;
        case 'l': listen_at = optarg; break;
        default: usage();
        }
    }
    if (!counters_path || (!!udp + !!ifname + !!listen_at) != 1 || (ifname && proto < 0))
        usage();
    int cfd = open(counters_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (cfd < 0 || ftruncate(cfd, COUNTERS * 8) < 0) die(counters_path);
    volatile uint64_t *counters =
        mmap(NULL, COUNTERS * 8, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
    if (counters == MAP_FAILED) die("mmap");

    int fd;
    struct sockaddr_storage local;
    if (listen_at) {
        socklen_t len = parse_endpoint(listen_at, &local);
        fd = socket(local.ss_family, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, (struct sockaddr *)&local, len) < 0 || listen(fd, 65535) < 0)
            die("tcp listen");
        counters[READY] = 1;
        for (;;) pause();
    }
    if (udp) {
        socklen_t len = parse_endpoint(udp, &local);
        fd = socket(local.ss_family, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        big_buffer(fd);
        if (bind(fd, (struct sockaddr *)&local, len) < 0) die("bind");
    } else {
        fd = socket(AF_PACKET, SOCK_DGRAM, htons(family == 4 ? ETH_P_IP : ETH_P_IPV6));
        if (fd < 0) die("socket(AF_PACKET)");
        int one = 1;
        setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
        big_buffer(fd);
        struct sockaddr_ll ll = {.sll_family = AF_PACKET,
                                 .sll_protocol = htons(family == 4 ? ETH_P_IP : ETH_P_IPV6),
                                 .sll_ifindex = (int)if_nametoindex(ifname)};
        if (!ll.sll_ifindex || bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0) die(ifname);
    }
    signal(SIGPIPE, SIG_IGN);

    static uint8_t buffers[BATCH][BUFFER];
    static struct iovec iov[BATCH];
    static struct sockaddr_storage peers[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buffers[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &peers[i];
    }
    counters[READY] = 1;
    uint64_t packets = 0, bytes = 0, other = 0, reflected = 0, reflect_errors = 0;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_len = BUFFER;
            msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvmmsg");
        }
        for (int i = 0; i < n; i++) {
            unsigned len = msgs[i].msg_len;
            if (!ifname || matches(buffers[i], len, family, proto, synack)) {
                packets++;
                bytes += len;
            } else {
                other++;
            }
            iov[i].iov_len = len;
        }
        if (reflect) {
            int done = 0;
            while (done < n) {
                int k = sendmmsg(fd, msgs + done, (unsigned)(n - done), 0);
                if (k < 0) {
                    if (errno == EINTR) continue;
                    reflect_errors += (uint64_t)(n - done); /* refused: lost, not retried */
                    break;
                }
                done += k;
                reflected += (uint64_t)k;
            }
        }
        counters[PACKETS] = packets;
        counters[BYTES] = bytes;
        counters[OTHER] = other;
        counters[REFLECTED] = reflected;
        counters[REFLECT_ERRORS] = reflect_errors;
    }
}
