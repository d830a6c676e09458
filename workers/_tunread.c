/* A batch of reads from a TUN device, compiled: workers/main.py's read loop without the
 * interpreter between the read(2) calls, and each packet copied once into a bytes object of
 * its own size (os.read(fd, 65536) allocates 64 KiB per packet, then shrinks it).
 * Optional like workers/engine/_fastpath.c: the Python loop does the same where it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
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

static PyMethodDef methods[] = {
    {"read_packets", read_packets, METH_VARARGS, read_packets_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tunread", "A batch of reads from a TUN device.", -1, methods,
};

PyMODINIT_FUNC PyInit__tunread(void)
{
    return PyModule_Create(&module);
}
