/* gen: the benchmark's traffic generator (never Python on the sending side).

   Sends IPv6 UDP datagrams (or TCP SYNs) from many flows with sendmmsg, in batches, at a fixed
   rate or flat out, then prints one line of JSON: {"sent": N, "errors": E, "seconds": S}.

     --mode 6to4   6to4-encapsulated (RFC 3056): a raw IPv4 protocol-41 socket bound to --src4,
                   the kernel writes the outer IPv4 header, we write the inner IPv6 packet.
     --mode ipv6   plain IPv6 (for TAYGA and the kernel reference): a raw IPv6 socket with
                   IPV6_HDRINCL (IPPROTO_RAW), we write the whole IPv6 packet.
     --mode ipv4   plain IPv4 UDP from --src4 to --dst4 (a CLAT's host side: one address, the
                   flows are source ports): a raw IPv4 socket with IP_HDRINCL (IPPROTO_RAW),
                   we write the whole packet; the kernel fills in the header checksum.
     --fragments   each packet is the first fragment (RFC 8200 §4.5: M set, offset 0, its own
                   identification) of a datagram whose rest never comes: a fragment flood
                   (make soak). The fragmentable part must be a multiple of 8 bytes.

   Flow i has source address <--prefix48>:<subnet>::<host> and source port --port-base + port,
   where subnet = i % S, host = 1 + (i / S) % H, port = (i / (S*H)) % P: consecutive packets
   cycle through the /64s first, so they spread over sixgate's workers (it shards by source
   /64). Transport checksums are complete: a one's-complement sum of everything that does not
   vary, plus the varying words per packet (RFC 1071 sums are linear).

   Stops after --count packets or --duration seconds (whichever comes first) or on SIGTERM. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 1024
#define IPV6_HEADER 40
#define IPV4_HEADER 20
#define UDP_HEADER 8
#define TCP_HEADER 20
#define FRAGMENT_HEADER 8
#define MAX_HEADER (IPV6_HEADER + FRAGMENT_HEADER + TCP_HEADER)

static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static void die(const char *what) { perror(what); exit(2); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint32_t sum16(const uint8_t *data, size_t len) {
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < len; i += 2) sum += (uint32_t)(data[i] << 8 | data[i + 1]);
    if (len & 1) sum += (uint32_t)data[len - 1] << 8;
    return sum;
}

static uint16_t fold(uint64_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

static void usage(void) {
    fprintf(stderr,
            "usage: gen --mode 6to4|ipv6|ipv4 [--src4 A --dst4 B] --prefix48 2002:c633:6401\n"
            "           --dst6 ADDR (ipv4: --src4 A --dst4 B only)\n"
            "           --dport P [--syn] [--payload N] [--subnets S] [--hosts H] [--ports P]\n"
            "           [--port-base B] [--rate PPS (0 = flat out)] [--count N] [--duration S]\n"
            "           [--batch B] [--first-flow F] [--fragments]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *mode = NULL, *src4 = NULL, *dst4 = NULL, *prefix48 = NULL, *dst6 = NULL;
    long dport = -1, payload = 18, subnets = 1, hosts = 1, ports = 1, port_base = 1024;
    long batch = 64, syn = 0, fragments = 0;
    double rate = 0, duration = 0;
    unsigned long long count = 0, first_flow = 0;
    static struct option options[] = {
        {"mode", 1, 0, 'm'}, {"src4", 1, 0, 's'}, {"dst4", 1, 0, 'd'}, {"prefix48", 1, 0, 'p'},
        {"dst6", 1, 0, 'D'}, {"dport", 1, 0, 'P'}, {"payload", 1, 0, 'l'},
        {"subnets", 1, 0, 'S'}, {"hosts", 1, 0, 'H'}, {"ports", 1, 0, 'n'},
        {"port-base", 1, 0, 'b'}, {"rate", 1, 0, 'r'}, {"count", 1, 0, 'c'},
        {"duration", 1, 0, 't'}, {"batch", 1, 0, 'B'}, {"syn", 0, 0, 'y'},
        {"first-flow", 1, 0, 'f'}, {"fragments", 0, 0, 'F'}, {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'm': mode = optarg; break;
        case 's': src4 = optarg; break;
        case 'd': dst4 = optarg; break;
        case 'p': prefix48 = optarg; break;
        case 'D': dst6 = optarg; break;
        case 'P': dport = atol(optarg); break;
        case 'l': payload = atol(optarg); break;
        case 'S': subnets = atol(optarg); break;
        case 'H': hosts = atol(optarg); break;
        case 'n': ports = atol(optarg); break;
        case 'b': port_base = atol(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'c': count = strtoull(optarg, NULL, 10); break;
        case 't': duration = atof(optarg); break;
        case 'B': batch = atol(optarg); break;
        case 'y': syn = 1; break;
        case 'f': first_flow = strtoull(optarg, NULL, 10); break;
        case 'F': fragments = 1; break;
        default: usage();
        }
    }
    int six_to_four = mode && strcmp(mode, "6to4") == 0;
    int ipv4 = mode && strcmp(mode, "ipv4") == 0;
    if (ipv4) {
        /* One source address: the flows are the source ports; a fixed IPv6 template below
           is never used. */
        if (!src4 || !dst4 || syn || fragments) usage();
        subnets = hosts = 1;
        prefix48 = "2001:db8";
        dst6 = "2001:db8::1";
    }
    if (!mode || (!six_to_four && !ipv4 && strcmp(mode, "ipv6") != 0) || !prefix48 || !dst6 ||
        dport < 0 || dport > 65535 || payload < 0 || payload > 1452 || subnets < 1 ||
        subnets > 65536 || hosts < 1 || ports < 1 || port_base + ports > 65536 || batch < 1 ||
        batch > MAX_BATCH || (six_to_four && (!src4 || !dst4)) || (!count && duration <= 0))
        usage();
    if (syn) payload = 0;

    /* The fixed part of every packet: IPv6 header + UDP or TCP header. */
    uint8_t template[MAX_HEADER] = {0};
    char prefix_text[64];
    snprintf(prefix_text, sizeof prefix_text, "%s::", prefix48);
    struct in6_addr src6, dst6_addr;
    if (inet_pton(AF_INET6, prefix_text, &src6) != 1 || inet_pton(AF_INET6, dst6, &dst6_addr) != 1)
        usage();
    int l4_header = syn ? TCP_HEADER : UDP_HEADER;
    int l4_length = l4_header + (int)payload;
    int l3 = IPV6_HEADER + (fragments ? FRAGMENT_HEADER : 0);
    if (fragments && l4_length % 8) usage(); /* RFC 8200 §4.5: non-last fragments are 8n */
    template[0] = 0x60;
    template[4] = (uint8_t)((l3 - IPV6_HEADER + l4_length) >> 8);
    template[5] = (uint8_t)(l3 - IPV6_HEADER + l4_length);
    template[6] = syn ? IPPROTO_TCP : IPPROTO_UDP;
    template[7] = 64;
    memcpy(template + 8, &src6, 16);
    memcpy(template + 24, &dst6_addr, 16);
    if (fragments) {
        template[IPV6_HEADER] = template[6]; /* the fragment header's next header */
        template[IPV6_HEADER + 3] = 1;       /* offset 0, M = 1: more fragments follow */
        template[6] = 44;                    /* IPv6 next header: Fragment */
    }
    uint8_t *l4 = template + l3;
    l4[2] = (uint8_t)(dport >> 8);
    l4[3] = (uint8_t)dport;
    if (syn) {
        l4[12] = 5 << 4;      /* data offset: 5 words */
        l4[13] = 0x02;        /* SYN */
        l4[14] = 0xfa;        /* window 64240 */
        l4[15] = 0xf0;
    } else {
        l4[4] = (uint8_t)(l4_length >> 8);
        l4[5] = (uint8_t)l4_length;
    }
    static uint8_t data[1500];
    for (long i = 0; i < payload; i++) data[i] = (uint8_t)(i * 7 + 1);
    /* RFC 8200 §8.1 pseudo-header: addresses, upper-layer length, next header. The varying
       words (subnet, host, source port, TCP sequence) are zero in the template and added per
       packet. */
    uint32_t base = sum16(template + 8, 32) + (uint32_t)l4_length +
                    (syn ? IPPROTO_TCP : IPPROTO_UDP) +
                    sum16(l4, (size_t)l4_header) + sum16(data, (size_t)payload);
    if (ipv4) {
        /* The IPv4 header instead (RFC 791), the UDP header after it, the IPv4 pseudo-header
           (RFC 768) in the sum. */
        struct in_addr s4, d4;
        if (inet_pton(AF_INET, src4, &s4) != 1 || inet_pton(AF_INET, dst4, &d4) != 1) usage();
        memset(template, 0, sizeof template);
        l3 = IPV4_HEADER;
        template[0] = 0x45;
        template[2] = (uint8_t)((l3 + l4_length) >> 8);
        template[3] = (uint8_t)(l3 + l4_length);
        template[8] = 64;
        template[9] = IPPROTO_UDP;
        memcpy(template + 12, &s4, 4);
        memcpy(template + 16, &d4, 4);
        l4 = template + l3;
        l4[2] = (uint8_t)(dport >> 8);
        l4[3] = (uint8_t)dport;
        l4[4] = (uint8_t)(l4_length >> 8);
        l4[5] = (uint8_t)l4_length;
        base = sum16(template + 12, 8) + (uint32_t)l4_length + IPPROTO_UDP +
               sum16(l4, (size_t)l4_header) + sum16(data, (size_t)payload);
    }

    int fd;
    struct sockaddr_storage to;
    socklen_t to_len;
    memset(&to, 0, sizeof to);
    if (ipv4) {
        fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW); /* IP_HDRINCL implied */
        if (fd < 0) die("socket(AF_INET, SOCK_RAW, IPPROTO_RAW)");
        struct sockaddr_in *remote = (struct sockaddr_in *)&to;
        remote->sin_family = AF_INET;
        if (inet_pton(AF_INET, dst4, &remote->sin_addr) != 1) usage();
        to_len = sizeof *remote;
    } else if (six_to_four) {
        fd = socket(AF_INET, SOCK_RAW, 41);
        if (fd < 0) die("socket(AF_INET, SOCK_RAW, 41)");
        struct sockaddr_in local = {.sin_family = AF_INET};
        if (inet_pton(AF_INET, src4, &local.sin_addr) != 1) usage();
        if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) die("bind --src4");
        struct sockaddr_in *remote = (struct sockaddr_in *)&to;
        remote->sin_family = AF_INET;
        if (inet_pton(AF_INET, dst4, &remote->sin_addr) != 1) usage();
        to_len = sizeof *remote;
    } else {
        fd = socket(AF_INET6, SOCK_RAW, IPPROTO_RAW);
        if (fd < 0) die("socket(AF_INET6, SOCK_RAW, IPPROTO_RAW)");
        struct sockaddr_in6 *remote = (struct sockaddr_in6 *)&to;
        remote->sin6_family = AF_INET6;
        remote->sin6_addr = dst6_addr;
        to_len = sizeof *remote;
    }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

    static uint8_t headers[MAX_BATCH][MAX_HEADER];
    static struct iovec iov[MAX_BATCH][2];
    static struct mmsghdr msgs[MAX_BATCH];
    for (int i = 0; i < MAX_BATCH; i++) {
        memcpy(headers[i], template, sizeof template);
        iov[i][0].iov_base = headers[i];
        iov[i][0].iov_len = (size_t)(l3 + l4_header);
        iov[i][1].iov_base = data;
        iov[i][1].iov_len = (size_t)payload;
        msgs[i].msg_hdr.msg_name = &to;
        msgs[i].msg_hdr.msg_namelen = to_len;
        msgs[i].msg_hdr.msg_iov = iov[i];
        msgs[i].msg_hdr.msg_iovlen = payload ? 2 : 1;
    }

    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    unsigned long long flows = (unsigned long long)subnets * hosts * ports;
    unsigned long long flow = first_flow % flows, sent = 0, errors = 0;
    /* At a fixed rate, send at most 1/2000 s worth of packets per call: small bursts. */
    long burst = batch;
    if (rate > 0 && rate / 2000 < burst) burst = rate / 2000 < 1 ? 1 : (long)(rate / 2000);
    double start = now_s(), deadline = duration > 0 ? start + duration : 1e300;
    while (!stopping) {
        double now = now_s();
        if (now >= deadline || (count && sent >= count)) break;
        if (rate > 0) {
            double due = start + sent / rate;
            if (due > now) {
                double wait = due - now;
                if (wait > 50e-6) {
                    struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                    nanosleep(&ts, NULL);
                }
                continue;
            }
        }
        long n = burst;
        if (count && count - sent < (unsigned long long)n) n = (long)(count - sent);
        for (long i = 0; i < n; i++) {
            uint8_t *h = headers[i];
            unsigned long long f = flow;
            unsigned subnet = (unsigned)(f % (unsigned long long)subnets);
            unsigned long long rest = f / (unsigned long long)subnets;
            uint32_t host = (uint32_t)(1 + rest % (unsigned long long)hosts);
            unsigned sport = (unsigned)(port_base + (long)(rest / (unsigned long long)hosts));
            if (++flow == flows) flow = 0;
            if (!ipv4) { /* the IPv6 source address's subnet and host */
                h[14] = (uint8_t)(subnet >> 8);
                h[15] = (uint8_t)subnet;
                h[20] = (uint8_t)(host >> 24);
                h[21] = (uint8_t)(host >> 16);
                h[22] = (uint8_t)(host >> 8);
                h[23] = (uint8_t)host;
            }
            h[l3] = (uint8_t)(sport >> 8);
            h[l3 + 1] = (uint8_t)sport;
            if (fragments) { /* a new datagram each packet: its own identification */
                uint32_t ident = (uint32_t)(sent + (unsigned long long)i);
                h[IPV6_HEADER + 4] = (uint8_t)(ident >> 24);
                h[IPV6_HEADER + 5] = (uint8_t)(ident >> 16);
                h[IPV6_HEADER + 6] = (uint8_t)(ident >> 8);
                h[IPV6_HEADER + 7] = (uint8_t)ident;
            }
            uint64_t sum = base + sport + (ipv4 ? 0 : subnet + (host >> 16) + (host & 0xffff));
            if (syn) {
                uint32_t seq = (uint32_t)(f * 2654435761u);
                h[l3 + 4] = (uint8_t)(seq >> 24);
                h[l3 + 5] = (uint8_t)(seq >> 16);
                h[l3 + 6] = (uint8_t)(seq >> 8);
                h[l3 + 7] = (uint8_t)seq;
                sum += (seq >> 16) + (seq & 0xffff);
            }
            uint16_t check = (uint16_t)~fold(sum);
            if (!syn && check == 0) check = 0xffff; /* RFC 768: 0 means "no checksum" */
            int at = l3 + (syn ? 16 : 6);
            h[at] = (uint8_t)(check >> 8);
            h[at + 1] = (uint8_t)check;
        }
        int done = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (done < 0) {
            if (errno != EINTR && errno != ENOBUFS && errno != EAGAIN) die("sendmmsg");
            done = 0;
        }
        sent += (unsigned long long)done;
        if (done < n) {
            /* Refused (no buffer): count it and send the same flows again next time. */
            errors += (unsigned long long)(n - done);
            flow = (flow + flows - (unsigned long long)(n - done) % flows) % flows;
        }
    }
    printf("{\"sent\": %llu, \"errors\": %llu, \"seconds\": %.6f}\n", sent, errors,
           now_s() - start);
    return 0;
}
