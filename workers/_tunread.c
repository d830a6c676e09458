/* A batch of reads from a TUN device, compiled: workers/main.py's read loop without the
 * interpreter between the read(2) calls, and each packet copied once into a bytes object of
 * its own size (os.read(fd, 65536) allocates 64 KiB per packet, then shrinks it).
 * Also workers/uring.py's per-packet work: each packet copied into its io_uring slot with its
 * length in its submission entry, and io_uring_enter(2) called without ctypes.
 * And a worker's whole loop around poll(2) for its TUN devices and its tunnel capture
 * (``serve``): read, the engine's compiled loops, write and send, with Python called only for
 * what they leave.
 * Optional like workers/engine/_fastpath.c: the Python loops do the same where it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_SIZE 65536

PyDoc_STRVAR(read_packets_doc,
"read_packets(fd, limit) -> list[bytes]\n"
"Up to ``limit`` packets from the non-blocking descriptor ``fd``, one read(2) each, until it\n"
"has no more (EAGAIN). Another error after the first packet ends the batch (the next call\n"
"raises it); before it, OSError.");

/* Up to ``limit`` packets from ``fd`` appended to ``packets``: how many, or -1 with an
 * exception set (an error before the first packet; a later one ends the batch). */
static Py_ssize_t read_into(int fd, Py_ssize_t limit, PyObject *packets)
{
    static char buffer[BUFFER_SIZE];
    Py_ssize_t read_count = 0;
    for (Py_ssize_t i = 0; i < limit; i++) {
        /* The GIL stays held: the reads do not block, and it guards the one buffer. */
        /* The system call itself: glibc's read(2) is a cancellation point, which in a
         * process with threads (ZeroMQ's) costs two calls around each read (about 1.3% of
         * a NAT64 worker's CPU at overload in perf); no thread is ever cancelled here. */
        ssize_t n = syscall(SYS_read, fd, buffer, BUFFER_SIZE);
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -1;
                i--;
                continue;
            }
            if (errno == EAGAIN || read_count > 0)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        PyObject *packet = PyBytes_FromStringAndSize(buffer, n);
        if (packet == NULL)
            return -1;
        int failed = PyList_Append(packets, packet);
        Py_DECREF(packet);
        if (failed < 0)
            return -1;
        read_count++;
    }
    return read_count;
}

static PyObject *read_packets(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "in", &fd, &limit))
        return NULL;
    PyObject *packets = PyList_New(0);
    if (packets == NULL)
        return NULL;
    if (read_into(fd, limit, packets) < 0) {
        Py_DECREF(packets);
        return NULL;
    }
    return packets;
}

PyDoc_STRVAR(fill_slots_doc,
"fill_slots(data, sqes, packets, start, mask, slot, sqe_size, len_at) -> None\n"
"workers/uring.py's per-packet loop: packet k is copied into slot i = (start + k) & mask of\n"
"``data`` (``slot`` bytes each) and its length into the u32 at sqe_size * i + len_at of\n"
"``sqes``. ValueError, before anything is written, for a packet longer than a slot or a\n"
"slot or entry outside its buffer.");

static PyObject *fill_slots(PyObject *self, PyObject *args)
{
    Py_buffer data, sqes;
    PyObject *packets;
    unsigned long long start, mask;
    Py_ssize_t slot, sqe_size, len_at;
    if (!PyArg_ParseTuple(args, "w*w*O!KKnnn", &data, &sqes, &PyList_Type, &packets, &start,
                          &mask, &slot, &sqe_size, &len_at))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = PyList_GET_SIZE(packets);
    if (slot <= 0 || sqe_size <= 0 || len_at < 0 || len_at + 4 > sqe_size) {
        PyErr_SetString(PyExc_ValueError, "bad slot or entry layout");
        goto done;
    }
    /* Check everything first: a batch is written whole or not at all. */
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *packet = PyList_GET_ITEM(packets, k);
        unsigned long long i = (start + (unsigned long long)k) & mask;
        Py_ssize_t length;
        if (PyBytes_Check(packet)) {
            length = PyBytes_GET_SIZE(packet);
        } else {  /* another bytes-like object (bytearray, memoryview): rare */
            Py_buffer view;
            if (PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE) < 0)
                goto done;
            length = view.len;
            PyBuffer_Release(&view);
        }
        if (length > slot || (i + 1) * (unsigned long long)slot > (unsigned long long)data.len
                || (i + 1) * (unsigned long long)sqe_size > (unsigned long long)sqes.len) {
            PyErr_SetString(PyExc_ValueError, "a packet does not fit its slot");
            goto done;
        }
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *packet = PyList_GET_ITEM(packets, k);
        unsigned long long i = (start + (unsigned long long)k) & mask;
        char *at = (char *)data.buf + i * (unsigned long long)slot;
        uint32_t length;
        if (PyBytes_Check(packet)) {
            length = (uint32_t)PyBytes_GET_SIZE(packet);
            memcpy(at, PyBytes_AS_STRING(packet), length);
        } else {
            Py_buffer view;
            if (PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE) < 0)
                goto done;  /* checked above: only a changed object can fail here */
            length = (uint32_t)(view.len <= slot ? view.len : slot);
            memcpy(at, view.buf, length);
            PyBuffer_Release(&view);
        }
        memcpy((char *)sqes.buf + i * (unsigned long long)sqe_size + len_at, &length, 4);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&sqes);
    return result;
}

PyDoc_STRVAR(uring_enter_doc,
"uring_enter(ring_fd, to_submit, min_complete, flags) -> int\n"
"io_uring_enter(2) without a signal mask: what it returns; -1 when a signal interrupted\n"
"it (EINTR: call again); OSError for any other error.");

static PyObject *uring_enter(PyObject *self, PyObject *args)
{
    int ring_fd;
    unsigned int to_submit, min_complete, flags;
    if (!PyArg_ParseTuple(args, "iIII", &ring_fd, &to_submit, &min_complete, &flags))
        return NULL;
    long done;
    Py_BEGIN_ALLOW_THREADS
    done = syscall(SYS_io_uring_enter, ring_fd, to_submit, min_complete, flags, NULL, 0);
    Py_END_ALLOW_THREADS
    if (done < 0) {
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return NULL;
            return PyLong_FromLong(-1);
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(done);
}

/* --- a worker's devices and capture served without the interpreter (issue 21) --------- */

#define SERVE_BATCH 256   /* packets per device read batch (workers/main.py TUN_BATCH) */
#define CAPTURE_BATCH_MAX 256  /* per recvmmsg(2): workers/capture.py's batch, at most */
#define SERVE_BUSY 8      /* a batch this big is read again before the next poll (BUSY_BATCH) */
#define SERVE_ROUNDS 4    /* at most this many batches per source per poll (INBOUND_BATCHES) */
#define SERVE_WATCH_MAX 16
#define SEND_BATCH 64

enum { IPV6 = 0, IPV4 = 1, CAPTURE = 2 };  /* the packet sources */

/* The worker's io_uring for the device's writes (workers/uring.py UringWriter, whose
 * ``compiled_ring`` gives its mmaps and offsets): entry i always writes slot i, and the SQ
 * array maps ring position i to entry i, as UringWriter set them up. */
typedef struct {
    int fd, held;
    Py_buffer sq, cq, sqes, data;
    Py_ssize_t sq_tail_at, cq_head_at, cq_tail_at, cqes_at, slot;
    unsigned sq_mask, cq_mask, entries;
} Ring;

#define SQE_SIZE 64    /* struct io_uring_sqe */
#define SQE_LEN_AT 24  /* its len field */
#define CQE_SIZE 16    /* struct io_uring_cqe: user_data, res, flags */
#define CQE_RES_AT 8

typedef struct {
    int fd[3], write_fd, send_fd, capture_batch;
    PyObject *inbound, *in_caches, *returning, *out_caches, *established, *ring_args;
    Ring ring;
    int ring_errno;  /* the ring failed as a whole: write(2) from then on */
    PyObject *tunnel_caches, *echoes, *allow;
    /* the engine's openers (a new session's first packet) and returner (its first answers),
     * and its own output lists, where what those Python calls answer waits */
    PyObject *open_from_ipv6, *open_from_tunnel, *returner, *pending;
    /* the flow table's journal (changed sessions: a dict; removed ones: a list), or None,
     * and how soon after it first holds anything the call returns for it to be sent */
    PyObject *journal;
    double journal_s;
    unsigned long ident;
    long df_threshold, mtu, max_mss;
    /* handed back */
    PyObject *leftover[3], *statuses, *to_tunnel;
    Py_ssize_t totals[2][13], translated[2], written, failed, captured, captured_bytes;
    Py_ssize_t sent, sent_bytes, send_failed;
    int send_errno;
    double seconds[2];
} Serve;

static double monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);  /* time.monotonic()'s clock */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* The ring's mmaps held for the call, their layout checked (0), or -1 with an exception. */
static int ring_hold(Ring *r, PyObject *args)
{
    PyObject *sq, *cq, *sqes, *data;
    if (!PyArg_ParseTuple(args, "iOOOOnInnInnI", &r->fd, &sq, &cq, &sqes, &data,
                          &r->sq_tail_at, &r->sq_mask, &r->cq_head_at, &r->cq_tail_at,
                          &r->cq_mask, &r->cqes_at, &r->slot, &r->entries))
        return -1;
    Py_buffer *views[4] = {&r->sq, &r->cq, &r->sqes, &r->data};
    PyObject *areas[4] = {sq, cq, sqes, data};
    for (int i = 0; i < 4; i++) {
        if (PyObject_GetBuffer(areas[i], views[i], PyBUF_WRITABLE) < 0) {
            while (i--)
                PyBuffer_Release(views[i]);
            return -1;
        }
    }
    r->held = 1;
    if (r->entries == 0 || r->sq_mask != r->entries - 1 || r->slot <= 0
            || r->sq_tail_at < 0 || r->sq_tail_at + 4 > r->sq.len
            || r->cq_head_at < 0 || r->cq_head_at + 4 > r->cq.len
            || r->cq_tail_at < 0 || r->cq_tail_at + 4 > r->cq.len
            || r->cqes_at < 0 || r->cqes_at + (Py_ssize_t)CQE_SIZE * (r->cq_mask + 1) > r->cq.len
            || (Py_ssize_t)SQE_SIZE * r->entries > r->sqes.len
            || r->slot * (Py_ssize_t)r->entries > r->data.len) {
        PyErr_SetString(PyExc_ValueError, "serve: the ring's layout does not fit its areas");
        return -1;
    }
    return 0;
}

static void ring_release(Ring *r)
{
    if (!r->held)
        return;
    PyBuffer_Release(&r->sq);
    PyBuffer_Release(&r->cq);
    PyBuffer_Release(&r->sqes);
    PyBuffer_Release(&r->data);
    r->held = 0;
}

/* ``count`` packets (bytes, each at most a slot) from ``packets[first:]`` submitted in one
 * io_uring_enter(2) that waits for all their completions (so no slot is reused while the
 * kernel may still read it): how many failed (res < 0), or -1 with errno when the ring
 * itself failed (how far it got is not known). */
static Py_ssize_t ring_submit(Ring *r, PyObject *packets, Py_ssize_t first, unsigned count)
{
    uint32_t *sq_tail = (uint32_t *)((char *)r->sq.buf + r->sq_tail_at);
    uint32_t *cq_head = (uint32_t *)((char *)r->cq.buf + r->cq_head_at);
    uint32_t *cq_tail = (uint32_t *)((char *)r->cq.buf + r->cq_tail_at);
    uint32_t tail = *sq_tail;  /* this worker is the ring's only producer */
    for (unsigned k = 0; k < count; k++) {
        PyObject *packet = PyList_GET_ITEM(packets, first + k);
        unsigned i = (tail + k) & r->sq_mask;
        uint32_t length = (uint32_t)PyBytes_GET_SIZE(packet);
        memcpy((char *)r->data.buf + (Py_ssize_t)i * r->slot, PyBytes_AS_STRING(packet), length);
        memcpy((char *)r->sqes.buf + (Py_ssize_t)i * SQE_SIZE + SQE_LEN_AT, &length, 4);
    }
    __atomic_store_n(sq_tail, tail + count, __ATOMIC_RELEASE);
    unsigned to_submit = count, waiting = count;
    Py_ssize_t failed = 0;
    while (waiting) {
        long done = syscall(SYS_io_uring_enter, r->fd, to_submit, waiting, 1u /* GETEVENTS */,
                            NULL, 0);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        to_submit -= (unsigned)done < to_submit ? (unsigned)done : to_submit;
        uint32_t head = *cq_head, ready = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE) - head;
        for (uint32_t j = 0; j < ready; j++) {
            int32_t res;
            memcpy(&res, (char *)r->cq.buf + r->cqes_at
                   + (Py_ssize_t)((head + j) & r->cq_mask) * CQE_SIZE + CQE_RES_AT, 4);
            failed += res < 0;
        }
        __atomic_store_n(cq_head, head + ready, __ATOMIC_RELEASE);
        waiting -= ready < waiting ? ready : waiting;
    }
    return failed;
}

/* Translated packets to the device: through the ring (one io_uring_enter per batch of up to
 * its entries) when there are several and it works, else one write(2) each. A refused write
 * is counted, never retried (as DeviceOut); a ring that fails as a whole counts the packets
 * it was given as failed and is not used again (s->ring_errno: Python says so and closes
 * it, as DeviceOut.write). -1 on error. */
static int write_out(Serve *s, PyObject *out)
{
    Py_ssize_t n = PyList_GET_SIZE(out);
    int by_ring = n > 1 && s->ring.held && !s->ring_errno;
    s->written += n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *packet = PyList_GET_ITEM(out, i);
        if (!PyBytes_Check(packet)) {
            PyErr_SetString(PyExc_TypeError, "a translated packet must be bytes");
            return -1;
        }
        if (PyBytes_GET_SIZE(packet) > s->ring.slot)
            by_ring = 0;  /* longer than a slot (never from the engine): write(2) each */
    }
    if (by_ring) {
        for (Py_ssize_t first = 0; first < n; first += s->ring.entries) {
            unsigned count = (unsigned)(n - first < s->ring.entries ? n - first
                                        : s->ring.entries);
            Py_ssize_t failed = ring_submit(&s->ring, out, first, count);
            if (failed < 0) {
                s->ring_errno = errno ? errno : EIO;
                s->failed += n - first;
                return 0;
            }
            s->failed += failed;
        }
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *packet = PyList_GET_ITEM(out, i);
        ssize_t written;
        do
            written = write(s->write_fd, PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet));
        while (written < 0 && errno == EINTR);
        if (written < 0)
            s->failed++;
    }
    return 0;
}

/* (packet, outer IPv4 destination) pairs to the tunnel by sendmmsg(2), each to port 0 of its
 * destination (the kernel writes the outer header), as workers/mmsg.py BatchSender: a packet
 * the kernel refuses is counted and skipped, never retried. Without a send socket they are
 * kept for Python (s->to_tunnel). -1 on error. */
static int send_out(Serve *s, PyObject *pairs)
{
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    if (s->send_fd < 0) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (PyList_Append(s->to_tunnel, PyList_GET_ITEM(pairs, i)) < 0)
                return -1;
        return 0;
    }
    struct mmsghdr msgs[SEND_BATCH];
    struct iovec iovs[SEND_BATCH];
    struct sockaddr_in names[SEND_BATCH];
    for (Py_ssize_t first = 0; first < n; first += SEND_BATCH) {
        unsigned count = (unsigned)(n - first < SEND_BATCH ? n - first : SEND_BATCH);
        memset(msgs, 0, sizeof(struct mmsghdr) * count);
        for (unsigned i = 0; i < count; i++) {
            PyObject *pair = PyList_GET_ITEM(pairs, first + i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
                    || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
                    || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))
                    || PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) != 4) {
                PyErr_SetString(PyExc_TypeError, "a tunnel packet must be (bytes, 4 bytes)");
                return -1;
            }
            PyObject *payload = PyTuple_GET_ITEM(pair, 0);
            iovs[i].iov_base = PyBytes_AS_STRING(payload);
            iovs[i].iov_len = (size_t)PyBytes_GET_SIZE(payload);
            memset(&names[i], 0, sizeof names[i]);
            names[i].sin_family = AF_INET;
            memcpy(&names[i].sin_addr, PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 1)), 4);
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            s->sent_bytes += PyBytes_GET_SIZE(payload);
        }
        unsigned done = 0;
        while (done < count) {
            int sent = sendmmsg(s->send_fd, msgs + done, count - done, 0);
            if (sent < 0) {
                if (errno == EINTR)
                    continue;
                s->send_errno = errno;  /* the first unsent packet failed: skip it */
                s->send_failed++;
                done++;
            } else {
                done += (unsigned)sent;
            }
        }
        s->sent += count;
    }
    return 0;
}

/* Up to ``batch`` (at most CAPTURE_BATCH_MAX) protocol-41 packets from the AF_PACKET
 * capture (workers/capture.py) by recvmmsg(2), appended to ``packets``, each one's tp_status
 * in ``statuses``, their bytes added to ``*size`` and in ``*special`` the index of the first
 * one the compiled loop must not see (the count when none): an outer fragment (Python puts it
 * back together) or one whose checksum a kernel peer left to an offload (Python completes
 * it), as TunnelCapture.complete sorts them. How many, -1 on error (EAGAIN: 0). The slots
 * are allocated at the first call (a worker without a capture never pays for them). */
static Py_ssize_t capture_into(int fd, int batch, PyObject *packets, unsigned *statuses,
                               Py_ssize_t *size, Py_ssize_t *special)
{
    typedef char Control[CMSG_SPACE(sizeof(struct tpacket_auxdata))];
    static char (*buffers)[BUFFER_SIZE];
    static Control *control;
    if (buffers == NULL) {
        buffers = PyMem_RawMalloc((size_t)CAPTURE_BATCH_MAX * BUFFER_SIZE);
        control = PyMem_RawMalloc(sizeof(Control) * CAPTURE_BATCH_MAX);
        if (buffers == NULL || control == NULL) {
            PyMem_RawFree(buffers);
            PyMem_RawFree(control);
            buffers = NULL;
            PyErr_NoMemory();
            return -1;
        }
    }
    if (batch < 1 || batch > CAPTURE_BATCH_MAX)
        batch = CAPTURE_BATCH_MAX;
    struct mmsghdr msgs[CAPTURE_BATCH_MAX];
    struct iovec iovs[CAPTURE_BATCH_MAX];
    memset(msgs, 0, sizeof(struct mmsghdr) * (size_t)batch);
    for (int i = 0; i < batch; i++) {
        iovs[i].iov_base = buffers[i];
        iovs[i].iov_len = BUFFER_SIZE;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = control[i];
        msgs[i].msg_hdr.msg_controllen = sizeof control[i];
    }
    int count;
    do
        count = recvmmsg(fd, msgs, (unsigned)batch, MSG_DONTWAIT, NULL);
    while (count < 0 && errno == EINTR);
    if (count < 0) {
        if (errno == EAGAIN)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    *special = count;
    for (int i = 0; i < count; i++) {
        unsigned status = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c != NULL;
             c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
            if (c->cmsg_level == SOL_PACKET && c->cmsg_type == PACKET_AUXDATA) {
                struct tpacket_auxdata aux;
                memcpy(&aux, CMSG_DATA(c), sizeof aux);
                status = aux.tp_status;
            }
        }
        const uint8_t *p = (const uint8_t *)buffers[i];
        unsigned length = msgs[i].msg_len;
        if (*special == count && (length < 20 || (p[6] & 0x3F) || p[7]
                                  || status & TP_STATUS_CSUMNOTREADY))
            *special = i;
        statuses[i] = status;
        *size += length;
        PyObject *packet = PyBytes_FromStringAndSize(buffers[i], length);
        int failed = packet == NULL || PyList_Append(packets, packet) < 0;
        Py_XDECREF(packet);
        if (failed)
            return -1;
    }
    return count;
}

/* statuses[start:stop] as a list (the captured packets left to Python need theirs). */
static PyObject *status_list(const unsigned *statuses, Py_ssize_t start, Py_ssize_t stop)
{
    PyObject *list = PyList_New(stop - start);
    for (Py_ssize_t i = start; list != NULL && i < stop; i++) {
        PyObject *number = PyLong_FromUnsignedLong(statuses[i]);
        if (number == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i - start, number);
    }
    return list;
}

/* One batch from ``source`` through its compiled loop (the IPv6 device and the capture:
 * ``inbound``; the IPv4 device: ``returning``), written and sent: how many packets were read,
 * -1 on error. From the first packet the loop did not take on, the batch is kept for Python
 * (s->leftover, and for the capture s->statuses), which takes the rest of the way: the
 * packets stay in order. */
static Py_ssize_t serve_batch(Serve *s, int source)
{
    PyObject *packets = PyList_New(0), *taken = NULL, *out = NULL;
    PyObject *to_tunnel = NULL, *now = NULL, *result = NULL;
    unsigned statuses[CAPTURE_BATCH_MAX];
    Py_ssize_t read_count = -1, got, stop;
    int back = source == IPV4, tunnel = source == CAPTURE;
    if (packets == NULL)
        return -1;
    if (tunnel) {
        got = capture_into(s->fd[CAPTURE], s->capture_batch, packets, statuses,
                           &s->captured_bytes, &stop);
        if (got > 0)
            s->captured += got;
    } else {
        got = stop = read_into(s->fd[source], SERVE_BATCH, packets);
    }
    if (got <= 0) {
        read_count = got;
        goto done;
    }
    taken = stop == got ? Py_NewRef(packets) : PyList_GetSlice(packets, 0, stop);
    double start = monotonic();
    out = PyList_New(0);
    to_tunnel = PyList_New(0);
    now = PyFloat_FromDouble(start);
    if (taken == NULL || out == NULL || to_tunnel == NULL || now == NULL)
        goto done;
    if (!back)  /* the capture's packets have their 20-byte outer header and echoes to us */
        result = PyObject_CallFunction(s->inbound, "OnOnkOOlOOOOlOl", taken, (Py_ssize_t)0,
                                       tunnel ? s->tunnel_caches : s->in_caches,
                                       (Py_ssize_t)(tunnel ? 20 : 0), s->ident, now,
                                       s->established, s->df_threshold, out, to_tunnel,
                                       tunnel ? s->echoes : Py_None,
                                       tunnel ? s->allow : Py_None, tunnel ? s->mtu : 0L,
                                       tunnel ? s->open_from_tunnel : s->open_from_ipv6,
                                       s->max_mss);
    else
        result = PyObject_CallFunction(s->returning, "OnOlOOOOOl", taken, (Py_ssize_t)0,
                                       s->out_caches, s->mtu, now, s->established,
                                       to_tunnel, out, s->returner, s->max_mss);
    if (result == NULL)
        goto done;
    Py_ssize_t count = back ? 9 : 13;
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2 + count) {
        PyErr_SetString(PyExc_TypeError, "a compiled loop returned an unexpected result");
        goto done;
    }
    Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(result, 0));
    unsigned long ident = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(result, 1));
    for (Py_ssize_t i = 0; i < count; i++)
        s->totals[back][i] += PyLong_AsSsize_t(PyTuple_GET_ITEM(result, 2 + i));
    if (PyErr_Occurred())
        goto done;
    if (!back)
        s->ident = ident;
    s->seconds[back] += monotonic() - start;
    s->translated[back] += index;
    if (PyList_GET_SIZE(out) && write_out(s, out) < 0)
        goto done;
    if (PyList_GET_SIZE(to_tunnel) && send_out(s, to_tunnel) < 0)
        goto done;
    if (index < got) {
        s->leftover[source] = PyList_GetSlice(packets, index, got);
        if (s->leftover[source] == NULL)
            goto done;
        if (tunnel) {
            Py_XSETREF(s->statuses, status_list(statuses, index, got));
            if (s->statuses == NULL)
                goto done;
        }
    }
    read_count = got;
done:
    Py_XDECREF(result);
    Py_XDECREF(now);
    Py_XDECREF(to_tunnel);
    Py_XDECREF(out);
    Py_XDECREF(taken);
    Py_DECREF(packets);
    return read_count;
}

/* Whether the engine's Python (an opener or the returner) queued packets of its own: a
 * refused first packet's answer, which the caller sends at once. */
static int engine_pending(Serve *s)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(s->pending); i++)
        if (PyList_GET_SIZE(PyTuple_GET_ITEM(s->pending, i)))
            return 1;
    return 0;
}

/* A source's batches for one poll: until one is small or one leaves packets to Python. The
 * last batch's size, -1 on error. */
static Py_ssize_t serve_source(Serve *s, int source)
{
    Py_ssize_t last = 0;
    Py_ssize_t busy = source == CAPTURE ? s->capture_batch : SERVE_BUSY;
    for (int round = 0; round < SERVE_ROUNDS && s->leftover[source] == NULL; round++) {
        last = serve_batch(s, source);
        if (last < busy)
            break;
    }
    return last;
}

static PyObject *totals_tuple(const Py_ssize_t *totals, Py_ssize_t count)
{
    PyObject *tuple = PyTuple_New(count);
    for (Py_ssize_t i = 0; tuple != NULL && i < count; i++) {
        PyObject *item = PyLong_FromSsize_t(totals[i]);
        if (item == NULL) {
            Py_CLEAR(tuple);
            break;
        }
        PyTuple_SET_ITEM(tuple, i, item);
    }
    return tuple;
}

PyDoc_STRVAR(serve_doc,
"serve(watch, timeout_ms, limit, fds, loops, ring) -> tuple\n"
"A worker's loop around poll(2), compiled: packets from its sources (``fds``: the NAT64's\n"
"IPv6 device, the IPv4 device, the tunnel's capture, each -1 when absent; the capture's\n"
"batch; the device to write and the tunnel's send socket) are read, translated by the engine's compiled loops\n"
"(``loops``: inbound, in_caches, returning, out_caches, ident, established, df_threshold,\n"
"mtu, tunnel_caches, echoes, allow, the openers of the IPv6 device and of the capture, the\n"
"returner, max_mss: workers/engine/_fastpath.c; the engine's output lists, where the\n"
"answers of those Python calls wait: the loop returns when one holds any; the flow table's\n"
"journal (changed, removed) or None and the seconds within which it returns once that holds\n"
"anything), written to the device\n"
"(several through ``ring``, workers/uring.py UringWriter.compiled_ring; None: write(2)\n"
"each) and sent to the tunnel by\n"
"sendmmsg(2), with no Python code run but the echo limit's, the openers' and the returner's.\n"
"Returns once any ``watch``\n"
"descriptor is readable, a batch left packets to Python, ``limit`` packets were translated,\n"
"``timeout_ms`` passed or a signal handler ran: workers/main.py ``Served``'s fields.");

static PyObject *serve(PyObject *self, PyObject *args)
{
    Serve s;
    memset(&s, 0, sizeof s);
    PyObject *watch;
    int timeout_ms;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!in(iiiiii)(OO!OO!kOllO!OOOOOlO!Od)O", &PyList_Type, &watch,
                          &timeout_ms, &limit, &s.fd[IPV6], &s.fd[IPV4], &s.fd[CAPTURE],
                          &s.capture_batch, &s.write_fd, &s.send_fd, &s.inbound, &PyDict_Type, &s.in_caches,
                          &s.returning, &PyDict_Type, &s.out_caches, &s.ident, &s.established,
                          &s.df_threshold, &s.mtu, &PyDict_Type, &s.tunnel_caches, &s.echoes,
                          &s.allow, &s.open_from_ipv6, &s.open_from_tunnel, &s.returner,
                          &s.max_mss, &PyTuple_Type, &s.pending, &s.journal, &s.journal_s,
                          &s.ring_args))
        return NULL;
    Py_ssize_t watched = PyList_GET_SIZE(watch);
    int well_formed = s.journal == Py_None || (PyTuple_Check(s.journal)
                                               && PyTuple_GET_SIZE(s.journal) == 2
                                               && PyDict_Check(PyTuple_GET_ITEM(s.journal, 0))
                                               && PyList_Check(PyTuple_GET_ITEM(s.journal, 1)));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(s.pending); i++)
        well_formed &= PyList_Check(PyTuple_GET_ITEM(s.pending, i));
    if (watched > SERVE_WATCH_MAX || !PyCallable_Check(s.inbound)
            || !PyCallable_Check(s.returning) || !well_formed
            || (s.ring_args != Py_None && !PyTuple_Check(s.ring_args))) {
        PyErr_SetString(PyExc_ValueError, "serve: too many descriptors, a loop not callable, "
                        "the engine's output not lists, the journal not (dict, list) or None "
                        "or a ring not a tuple");
        return NULL;
    }
    if (s.ring_args != Py_None && ring_hold(&s.ring, s.ring_args) < 0) {
        ring_release(&s.ring);
        return NULL;
    }
    struct pollfd fds[3 + SERVE_WATCH_MAX];
    for (int i = 0; i < 3; i++)
        fds[i].fd = s.fd[i];  /* a negative descriptor is not polled */
    for (Py_ssize_t i = 0; i < watched; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(watch, i));
        if (fd == -1 && PyErr_Occurred()) {
            ring_release(&s.ring);
            return NULL;
        }
        fds[3 + i].fd = (int)fd;
    }
    for (Py_ssize_t i = 0; i < 3 + watched; i++)
        fds[i].events = POLLIN;
    PyObject *ready = PyList_New(0), *result = NULL;
    s.to_tunnel = PyList_New(0);
    if (ready == NULL || s.to_tunnel == NULL)
        goto done;
    double deadline = monotonic() + (timeout_ms > 0 ? timeout_ms : 0) / 1000.0;
    int journaled = 0;  /* the journal held something: the deadline was brought forward */
    for (;;) {
        double left = deadline - monotonic();
        int wait = left > 0 ? (int)(left * 1000.0) + 1 : 0;
        int polled;
        Py_BEGIN_ALLOW_THREADS
        polled = poll(fds, (nfds_t)(3 + watched), wait);
        Py_END_ALLOW_THREADS
        if (polled < 0) {
            if (errno != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
            if (PyErr_CheckSignals() < 0)
                goto done;
            break;  /* a handler ran: the caller's loop decides whether to go on */
        }
        for (Py_ssize_t i = 0; i < watched; i++) {
            if (!fds[3 + i].revents)
                continue;
            PyObject *fd = PyLong_FromLong(fds[3 + i].fd);
            int failed = fd == NULL || PyList_Append(ready, fd) < 0;
            Py_XDECREF(fd);
            if (failed)
                goto done;
        }
        int ipv4_ready = fds[IPV4].revents != 0;
        /* What a small batch wrote to the device the kernel mostly answers at once (an
         * echo, a local service): an idle worker reads the IPv4 device now, not after another
         * poll; a busy one leaves it to the poll (no read that finds nothing). */
        for (int source = IPV6; source <= CAPTURE; source += 2) {
            if (!fds[source].revents)
                continue;
            Py_ssize_t written = s.written, last = serve_source(&s, source);
            if (last < 0)
                goto done;
            ipv4_ready |= 0 < last && last < SERVE_BUSY && s.written > written;
        }
        /* Served even when the other side left packets to Python: the two directions keep
         * no order between them, and under a flood of new sessions (each left to Python) the
         * answers would otherwise never be read. */
        if (ipv4_ready && s.fd[IPV4] >= 0 && serve_source(&s, IPV4) < 0)
            goto done;
        /* What the openers changed in the flow table is sent within the journal's interval
         * (workers/journal.py FLUSH_INTERVAL_S), however long this call would wait. */
        if (!journaled && s.journal != Py_None
                && (PyDict_GET_SIZE(PyTuple_GET_ITEM(s.journal, 0))
                    || PyList_GET_SIZE(PyTuple_GET_ITEM(s.journal, 1)))) {
            journaled = 1;
            double due = monotonic() + s.journal_s;
            if (due < deadline)
                deadline = due;
        }
        if (PyList_GET_SIZE(ready) || s.leftover[IPV6] || s.leftover[IPV4]
                || s.leftover[CAPTURE] || PyList_GET_SIZE(s.to_tunnel) || engine_pending(&s)
                || s.translated[0] + s.translated[1] >= limit || monotonic() >= deadline)
            break;
    }
    for (int i = 0; i < 3; i++)
        if (s.leftover[i] == NULL && (s.leftover[i] = PyList_New(0)) == NULL)
            goto done;
    if (s.statuses == NULL && (s.statuses = PyList_New(0)) == NULL)
        goto done;
    result = Py_BuildValue("(OkOOOOONNddnnnnnnnnii)", ready, s.ident, s.leftover[IPV6],
                           s.leftover[IPV4], s.leftover[CAPTURE], s.statuses, s.to_tunnel,
                           totals_tuple(s.totals[0], 13), totals_tuple(s.totals[1], 9),
                           s.seconds[0], s.seconds[1], s.translated[0], s.translated[1],
                           s.failed, s.captured, s.captured_bytes, s.sent, s.sent_bytes,
                           s.send_failed, s.send_errno, s.ring_errno);
done:
    ring_release(&s.ring);
    Py_XDECREF(ready);
    Py_XDECREF(s.to_tunnel);
    Py_XDECREF(s.statuses);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(s.leftover[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"read_packets", read_packets, METH_VARARGS, read_packets_doc},
    {"fill_slots", fill_slots, METH_VARARGS, fill_slots_doc},
    {"uring_enter", uring_enter, METH_VARARGS, uring_enter_doc},
    {"serve", serve, METH_VARARGS, serve_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tunread", "A batch of reads from a TUN device.", -1, methods,
};

PyMODINIT_FUNC PyInit__tunread(void)
{
    return PyModule_Create(&module);
}
