/* A batch of reads from a TUN device, compiled: workers/main.py's read loop without the
 * interpreter between the read(2) calls, and each packet copied once into a bytes object of
 * its own size (os.read(fd, 65536) allocates 64 KiB per packet, then shrinks it).
 * Also workers/uring.py's per-packet work: each packet copied into its io_uring slot with its
 * length in its submission entry, and io_uring_enter(2) called without ctypes.
 * And a NAT64 worker's whole loop around poll(2) for its TUN devices (``serve``): read,
 * the engine's compiled loops, write, with Python called only for what they leave.
 * Optional like workers/engine/_fastpath.c: the Python loops do the same where it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
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
        ssize_t n = read(fd, buffer, BUFFER_SIZE);
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

/* --- a NAT64's devices served without the interpreter (issue 21: latency) ------------ */

#define SERVE_BATCH 256   /* packets per read batch (workers/main.py TUN_BATCH) */
#define SERVE_BUSY 8      /* a batch this big is read again before the next poll (BUSY_BATCH) */
#define SERVE_ROUNDS 4    /* at most this many batches per device per poll (INBOUND_BATCHES) */
#define SERVE_WATCH_MAX 16

typedef struct {
    int ipv6_fd, ipv4_fd, write_fd;
    PyObject *inbound, *in_caches, *returning, *out_caches, *established, *writer;
    unsigned long ident;
    long df_threshold, mtu;
    /* handed back */
    PyObject *leftover[2], *to_tunnel;
    Py_ssize_t totals[2][13], translated[2], failed;
    double seconds[2];
} Serve;

static double monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);  /* time.monotonic()'s clock */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* A batch's translated packets to the device: one write(2) each, or through ``writer``
 * (the worker's DeviceOut.write: one io_uring submission) when there are several. A refused
 * write is counted, never retried (as DeviceOut). -1 on error. */
static int write_out(Serve *s, PyObject *out)
{
    Py_ssize_t n = PyList_GET_SIZE(out);
    if (n > 1 && s->writer != Py_None) {
        PyObject *failed = PyObject_CallOneArg(s->writer, out);
        if (failed == NULL)
            return -1;
        Py_ssize_t count = PyLong_AsSsize_t(failed);
        Py_DECREF(failed);
        if (count == -1 && PyErr_Occurred())
            return -1;
        s->failed += count;
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *packet = PyList_GET_ITEM(out, i);
        if (!PyBytes_Check(packet)) {
            PyErr_SetString(PyExc_TypeError, "a translated packet must be bytes");
            return -1;
        }
        ssize_t written;
        do
            written = write(s->write_fd, PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet));
        while (written < 0 && errno == EINTR);
        if (written < 0)
            s->failed++;
    }
    return 0;
}

/* One batch from the IPv6 device (``v6``, through the engine's compiled ``inbound``) or the
 * IPv4 one (``returning``), written out: how many packets were read, -1 on error. From the
 * first packet the loop did not take on, the batch is kept for Python (s->leftover), which
 * takes the rest of the way (the packets stay in order); a tunnel client's packets go to
 * s->to_tunnel for Python's sender. */
static Py_ssize_t serve_batch(Serve *s, int v6)
{
    PyObject *packets = PyList_New(0), *out = NULL, *now = NULL, *result = NULL;
    Py_ssize_t read_count = -1;
    if (packets == NULL)
        return -1;
    Py_ssize_t got = read_into(v6 ? s->ipv6_fd : s->ipv4_fd, SERVE_BATCH, packets);
    if (got <= 0) {
        read_count = got;
        goto done;
    }
    double start = monotonic();
    out = PyList_New(0);
    now = PyFloat_FromDouble(start);
    if (out == NULL || now == NULL)
        goto done;
    if (v6)
        result = PyObject_CallFunction(s->inbound, "OnOnkOOlOOOOl", packets, (Py_ssize_t)0,
                                       s->in_caches, (Py_ssize_t)0, s->ident, now,
                                       s->established, s->df_threshold, out, s->to_tunnel,
                                       Py_None, Py_None, 0L);
    else
        result = PyObject_CallFunction(s->returning, "OnOlOOOO", packets, (Py_ssize_t)0,
                                       s->out_caches, s->mtu, now, s->established,
                                       s->to_tunnel, out);
    if (result == NULL)
        goto done;
    Py_ssize_t count = v6 ? 13 : 9;
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2 + count) {
        PyErr_SetString(PyExc_TypeError, "a compiled loop returned an unexpected result");
        goto done;
    }
    Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(result, 0));
    unsigned long ident = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(result, 1));
    for (Py_ssize_t i = 0; i < count; i++)
        s->totals[!v6][i] += PyLong_AsSsize_t(PyTuple_GET_ITEM(result, 2 + i));
    if (PyErr_Occurred())
        goto done;
    if (v6)
        s->ident = ident;
    s->seconds[!v6] += monotonic() - start;
    s->translated[!v6] += index;
    if (PyList_GET_SIZE(out) && write_out(s, out) < 0)
        goto done;
    if (index < got) {
        s->leftover[!v6] = PyList_GetSlice(packets, index, got);
        if (s->leftover[!v6] == NULL)
            goto done;
    }
    read_count = got;
done:
    Py_XDECREF(result);
    Py_XDECREF(now);
    Py_XDECREF(out);
    Py_DECREF(packets);
    return read_count;
}

/* A device's batches for one poll: until one is small or one leaves packets to Python. The
 * last batch's size, -1 on error. */
static Py_ssize_t serve_device(Serve *s, int v6)
{
    Py_ssize_t last = 0;
    for (int round = 0; round < SERVE_ROUNDS && s->leftover[!v6] == NULL; round++) {
        last = serve_batch(s, v6);
        if (last < SERVE_BUSY)
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
"serve(watch, timeout_ms, ipv6_fd, ipv4_fd, write_fd, inbound, in_caches, returning,\n"
"      out_caches, ident, established, df_threshold, mtu, writer, limit)\n"
"A NAT64 worker's loop around poll(2) for its two TUN devices, compiled: each device's\n"
"packets are read, translated by the engine's compiled loops (``inbound`` with\n"
"``in_caches``, ``returning`` with ``out_caches``: workers/engine/_fastpath.c) and written\n"
"to ``write_fd`` (``writer(list)`` -> failed, for several; None: write(2) each) with no\n"
"Python code run. Returns to the caller once any ``watch`` descriptor is readable, a batch\n"
"left packets to Python, a tunnel client's packet is due, ``limit`` packets were\n"
"translated, ``timeout_ms`` passed or a signal handler ran: (ready watch descriptors, ident,\n"
"IPv6 packets left to Python, IPv4 ones, (packet, outer) for the tunnel, the inbound\n"
"loop's 13 totals, the returning loop's 9, seconds in each loop, packets each translated,\n"
"writes refused).");

static PyObject *serve(PyObject *self, PyObject *args)
{
    Serve s;
    memset(&s, 0, sizeof s);
    PyObject *watch;
    int timeout_ms;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!iiiiOO!OO!kOllOn", &PyList_Type, &watch, &timeout_ms,
                          &s.ipv6_fd, &s.ipv4_fd, &s.write_fd, &s.inbound, &PyDict_Type,
                          &s.in_caches, &s.returning, &PyDict_Type, &s.out_caches, &s.ident,
                          &s.established, &s.df_threshold, &s.mtu, &s.writer, &limit))
        return NULL;
    Py_ssize_t watched = PyList_GET_SIZE(watch);
    if (watched > SERVE_WATCH_MAX || !PyCallable_Check(s.inbound)
            || !PyCallable_Check(s.returning)
            || (s.writer != Py_None && !PyCallable_Check(s.writer))) {
        PyErr_SetString(PyExc_ValueError, "serve: too many descriptors or a loop not callable");
        return NULL;
    }
    struct pollfd fds[2 + SERVE_WATCH_MAX];
    fds[0].fd = s.ipv6_fd;
    fds[1].fd = s.ipv4_fd;
    for (Py_ssize_t i = 0; i < watched; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(watch, i));
        if (fd == -1 && PyErr_Occurred())
            return NULL;
        fds[2 + i].fd = (int)fd;
    }
    for (Py_ssize_t i = 0; i < 2 + watched; i++)
        fds[i].events = POLLIN;
    PyObject *ready = PyList_New(0), *result = NULL;
    s.to_tunnel = PyList_New(0);
    if (ready == NULL || s.to_tunnel == NULL)
        goto done;
    double deadline = monotonic() + (timeout_ms > 0 ? timeout_ms : 0) / 1000.0;
    for (;;) {
        double left = deadline - monotonic();
        int wait = left > 0 ? (int)(left * 1000.0) + 1 : 0;
        int polled;
        Py_BEGIN_ALLOW_THREADS
        polled = poll(fds, (nfds_t)(2 + watched), wait);
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
            if (!fds[2 + i].revents)
                continue;
            PyObject *fd = PyLong_FromLong(fds[2 + i].fd);
            int failed = fd == NULL || PyList_Append(ready, fd) < 0;
            Py_XDECREF(fd);
            if (failed)
                goto done;
        }
        int ipv4_ready = fds[1].revents != 0;
        if (fds[0].revents) {
            Py_ssize_t last = serve_device(&s, 1);
            if (last < 0)
                goto done;
            /* What it wrote the kernel mostly answers at once (an echo, a local service):
             * an idle worker reads it now, not after another poll; a busy one leaves it to
             * the poll (no read that finds nothing). */
            ipv4_ready |= 0 < last && last < SERVE_BUSY;
        }
        if (ipv4_ready && s.leftover[0] == NULL && serve_device(&s, 0) < 0)
            goto done;
        if (PyList_GET_SIZE(ready) || s.leftover[0] || s.leftover[1]
                || PyList_GET_SIZE(s.to_tunnel) || s.translated[0] + s.translated[1] >= limit
                || monotonic() >= deadline)
            break;
    }
    for (int i = 0; i < 2; i++)
        if (s.leftover[i] == NULL && (s.leftover[i] = PyList_New(0)) == NULL)
            goto done;
    result = Py_BuildValue("(OkOOONNddnnn)", ready, s.ident, s.leftover[0], s.leftover[1],
                           s.to_tunnel, totals_tuple(s.totals[0], 13),
                           totals_tuple(s.totals[1], 9), s.seconds[0], s.seconds[1],
                           s.translated[0], s.translated[1], s.failed);
done:
    Py_XDECREF(ready);
    Py_XDECREF(s.to_tunnel);
    Py_XDECREF(s.leftover[0]);
    Py_XDECREF(s.leftover[1]);
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
