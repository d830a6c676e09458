/* pinger: ICMPv6 echo round-trip times, like ping -6, with no program in the path but ours.

     --mode 6to4   echo requests encapsulated in IPv4 protocol 41 (RFC 3056) on a raw socket
                   bound to --src4, replies read from the same socket: the path through sixgate
                   without the lab's Python tunnel peer in it.
     --mode ipv6   echo requests on a raw ICMPv6 socket (the kernel writes the IPv6 header and
                   the checksum, RFC 3542 §3.1): the path through TAYGA.

   Sends --count requests every --interval-ms, waits up to 1 s for each reply, prints one line
   of JSON: {"sent": N, "received": M, "rtt_us": [...]} (round trips of the replies that came). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ICMP6_ECHO_REQUEST 128
#define ICMP6_ECHO_REPLY 129
#define PAYLOAD 56

static void die(const char *what) { perror(what); exit(2); }

static void usage(void) {
    fprintf(stderr, "usage: pinger --mode 6to4|ipv6 --src6 ADDR --dst6 ADDR [--src4 A --dst4 B]"
                    " [--count N] [--interval-ms MS]\n");
    exit(2);
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static uint16_t checksum(const uint8_t *src6, const uint8_t *dst6, const uint8_t *icmp,
                         size_t len) {
    uint64_t sum = 0;
    for (int i = 0; i < 16; i += 2) sum += (uint32_t)(src6[i] << 8 | src6[i + 1]);
    for (int i = 0; i < 16; i += 2) sum += (uint32_t)(dst6[i] << 8 | dst6[i + 1]);
    sum += len + 58;
    for (size_t i = 0; i + 1 < len; i += 2) sum += (uint32_t)(icmp[i] << 8 | icmp[i + 1]);
    if (len & 1) sum += (uint32_t)icmp[len - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

int main(int argc, char **argv) {
    const char *mode = NULL, *src4 = NULL, *dst4 = NULL, *src6_text = NULL, *dst6_text = NULL;
    long count = 100, interval_ms = 10;
    static struct option options[] = {
        {"mode", 1, 0, 'm'}, {"src4", 1, 0, 's'}, {"dst4", 1, 0, 'd'}, {"src6", 1, 0, 'S'},
        {"dst6", 1, 0, 'D'}, {"count", 1, 0, 'c'}, {"interval-ms", 1, 0, 'i'}, {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'm': mode = optarg; break;
        case 's': src4 = optarg; break;
        case 'd': dst4 = optarg; break;
        case 'S': src6_text = optarg; break;
        case 'D': dst6_text = optarg; break;
        case 'c': count = atol(optarg); break;
        case 'i': interval_ms = atol(optarg); break;
        default: usage();
        }
    }
    int six_to_four = mode && strcmp(mode, "6to4") == 0;
    uint8_t src6[16], dst6[16];
    if (!mode || !src6_text || !dst6_text || count < 1 || count > 100000 ||
        inet_pton(AF_INET6, src6_text, src6) != 1 || inet_pton(AF_INET6, dst6_text, dst6) != 1 ||
        (six_to_four && (!src4 || !dst4)))
        usage();

    int fd;
    struct sockaddr_storage to;
    socklen_t to_len;
    memset(&to, 0, sizeof to);
    if (six_to_four) {
        fd = socket(AF_INET, SOCK_RAW, 41);
        if (fd < 0) die("socket(AF_INET, SOCK_RAW, 41)");
        struct sockaddr_in local = {.sin_family = AF_INET};
        struct sockaddr_in *remote = (struct sockaddr_in *)&to;
        remote->sin_family = AF_INET;
        if (inet_pton(AF_INET, src4, &local.sin_addr) != 1 ||
            inet_pton(AF_INET, dst4, &remote->sin_addr) != 1)
            usage();
        if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) die("bind --src4");
        to_len = sizeof *remote;
    } else {
        fd = socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6);
        if (fd < 0) die("socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)");
        struct sockaddr_in6 local = {.sin6_family = AF_INET6};
        memcpy(&local.sin6_addr, src6, 16);
        if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) die("bind --src6");
        struct sockaddr_in6 *remote = (struct sockaddr_in6 *)&to;
        remote->sin6_family = AF_INET6;
        memcpy(&remote->sin6_addr, dst6, 16);
        to_len = sizeof *remote;
    }

    uint16_t ident = (uint16_t)getpid();
    double *rtts = calloc((size_t)count, sizeof *rtts);
    long received = 0;
    uint8_t packet[40 + 8 + PAYLOAD], reply[2048];
    for (long seq = 0; seq < count; seq++) {
        uint8_t *icmp = six_to_four ? packet + 40 : packet;
        size_t icmp_len = 8 + PAYLOAD;
        memset(icmp, 0, icmp_len);
        icmp[0] = ICMP6_ECHO_REQUEST;
        icmp[4] = (uint8_t)(ident >> 8);
        icmp[5] = (uint8_t)ident;
        icmp[6] = (uint8_t)(seq >> 8);
        icmp[7] = (uint8_t)seq;
        for (int i = 0; i < PAYLOAD; i++) icmp[8 + i] = (uint8_t)i;
        size_t len = icmp_len;
        if (six_to_four) {
            memset(packet, 0, 40);
            packet[0] = 0x60;
            packet[4] = (uint8_t)(icmp_len >> 8);
            packet[5] = (uint8_t)icmp_len;
            packet[6] = 58;
            packet[7] = 64;
            memcpy(packet + 8, src6, 16);
            memcpy(packet + 24, dst6, 16);
            uint16_t sum = checksum(src6, dst6, icmp, icmp_len);
            icmp[2] = (uint8_t)(sum >> 8);
            icmp[3] = (uint8_t)sum;
            len += 40;
        }
        double sent_at = now_us();
        if (sendto(fd, packet, len, 0, (struct sockaddr *)&to, to_len) < 0) die("sendto");
        double give_up = sent_at + 1e6;
        for (;;) {
            double left = give_up - now_us();
            if (left <= 0) break;
            struct pollfd p = {fd, POLLIN, 0};
            if (poll(&p, 1, (int)(left / 1000) + 1) <= 0) continue;
            ssize_t n = recv(fd, reply, sizeof reply, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                die("recv");
            }
            const uint8_t *r = reply;
            if (six_to_four) { /* outer IPv4 header, then IPv6, then ICMPv6 */
                size_t ihl = (size_t)(reply[0] & 15) * 4;
                if ((size_t)n < ihl + 48 || reply[ihl + 6] != 58) continue;
                r = reply + ihl + 40;
            } else if (n < 8) {
                continue;
            }
            if (r[0] == ICMP6_ECHO_REPLY && (r[4] << 8 | r[5]) == ident &&
                (r[6] << 8 | r[7]) == (seq & 0xffff)) {
                rtts[received++] = now_us() - sent_at;
                break;
            }
        }
        double next = sent_at + interval_ms * 1000.0;
        double wait = next - now_us();
        if (wait > 0) usleep((useconds_t)wait);
    }
    printf("{\"sent\": %ld, \"received\": %ld, \"rtt_us\": [", count, received);
    for (long i = 0; i < received; i++) printf("%s%.1f", i ? ", " : "", rtts[i]);
    printf("]}\n");
    return 0;
}
