/* A batch of reads from a TUN device, compiled: workers/main.py's read loop without the
 * interpreter between the read(2) calls, and each packet copied once into a bytes object of
 * its own size (os.read(fd, 65536) allocates 64 KiB per packet, then shrinks it).
 * Also workers/uring.py's per-packet work: each packet copied into its io_uring slot with its
 * length in its submission entry, and io_uring_enter(2) called without ctypes.
 * Optional like workers/engine/_fastpath.c: the Python loops do the same where it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BUFFER_SIZE 65536

PyDoc_STRVAR(read_packets_doc,
"read_packets(fd, limit) -> list[bytes]\n"
"Up to ``limit`` packets from the non-blocking descriptor ``fd``, one read(2) each, until it\n"
"has no more (EAGAIN). Another error after the first packet ends the batch (the next call\n"
"raises it); before it, OSError.");

static PyObject *read_packets(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "in", &fd, &limit))
        return NULL;
    static char buffer[BUFFER_SIZE];
    PyObject *packets = PyList_New(0);
    if (packets == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < limit; i++) {
        /* The GIL stays held: the reads do not block, and it guards the one buffer. */
        ssize_t n = read(fd, buffer, BUFFER_SIZE);
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto fail;
                i--;
                continue;
            }
            if (errno == EAGAIN || PyList_GET_SIZE(packets) > 0)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        PyObject *packet = PyBytes_FromStringAndSize(buffer, n);
        if (packet == NULL)
            goto fail;
        int failed = PyList_Append(packets, packet);
        Py_DECREF(packet);
        if (failed < 0)
            goto fail;
    }
    return packets;
fail:
    Py_DECREF(packets);
    return NULL;
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

static PyMethodDef methods[] = {
    {"read_packets", read_packets, METH_VARARGS, read_packets_doc},
    {"fill_slots", fill_slots, METH_VARARGS, fill_slots_doc},
    {"uring_enter", uring_enter, METH_VARARGS, uring_enter_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tunread", "A batch of reads from a TUN device.", -1, methods,
};

PyMODINIT_FUNC PyInit__tunread(void)
{
    return PyModule_Create(&module);
}
