/* The fast path's batch loops, compiled: workers/engine/fastpath.py in C, for speed only.
 *
 * The engine stays in Python: it decides, builds a session's template on its first packet
 * and handles every packet that is not the plain case. These loops only apply templates the
 * engine built, to a run of plain packets of live sessions, and stop at the first packet they
 * do not translate (no template, a dead session, a TCP session not established, a flag that
 * moves the state machine, a checksum that does not verify, hop limit/TTL 1, a size that is
 * not the header's, too big for the MTU, ...). The caller hands that packet to the Python
 * path and calls again after it, so packets leave in the order they came.
 *
 * Each check and each output byte is fast_v6_to_v4 / fast_v4_to_v6's, or for NAT64's echo
 * fast_echo_v6_to_v4 / fast_echo_v4_to_v6's (fastpath.py, with the RFC sections there);
 * tests/unit/test_fastpath_compiled.py compares the two packet for packet.
 * No I/O, no state of its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define ECHO_REPLY_HOP_LIMIT 64
#define TCP_SYN_FIN_RST 0x07
#define TCP_SYN 0x02
#define MAX_TRANSLATED_SEGMENT (65535 - 20)
#define IPV4_DF 0x4000
#define IPV4_MF_OFFSET 0x3FFF

static PyObject *str_last_seen, *str_alive, *str_state, *str_pool4, *str_target4, *str_pport,
                *str_tport, *str_gw6, *str_client6, *str_gwport, *str_cport;

/* The ones' complement sum of a byte string, odd last byte padded with zero (RFC 1071),
 * reduced modulo 0xffff: the value fastpath.py gets from int.from_bytes(...) % 0xFFFF.
 * Summed as native 32-bit words into 64 bits and folded (RFC 1071 §2(B): the sum does not
 * depend on byte order, the folded result is swapped back; §4.1's 32-bit loop): a quarter
 * of the work of 16-bit big-endian words, the checksum verification of a 1400-byte packet
 * (issue 21) 5x cheaper. */
static uint32_t sum_mod(const uint8_t *p, Py_ssize_t n)
{
    uint64_t sum = 0;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint32_t w[4];
        memcpy(w, p + i, 16);
        sum += (uint64_t)w[0] + w[1] + w[2] + w[3];
    }
    for (; i + 4 <= n; i += 4) {
        uint32_t w;
        memcpy(&w, p + i, 4);
        sum += w;
    }
    uint8_t tail[4] = {0, 0, 0, 0};
    uint32_t last;
    memcpy(tail, p + i, (size_t)(n - i));
    memcpy(&last, tail, 4);
    sum += last;
    sum = (sum & 0xFFFFFFFF) + (sum >> 32);
    sum = (sum & 0xFFFFFFFF) + (sum >> 32);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    uint32_t folded = (uint32_t)sum;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    folded = (folded >> 8 | folded << 8) & 0xFFFF;
#endif
    return folded % 0xFFFF;
}

static long mod_ffff(long long value)
{
    long long r = value % 0xFFFF;
    return (long)(r < 0 ? r + 0xFFFF : r);
}

static inline unsigned get16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

static inline void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Where a Session keeps ``alive``, ``state`` and ``last_seen``: workers/engine/flows.py's
 * Session has __slots__, each a member descriptor at a fixed offset in the object. Read once
 * per type (the descriptors of the type's own class, checked to be plain object slots), the
 * loops read and write those slots directly instead of looking the names up per packet
 * (issue 16: about 1.5% of a packet in perf). Any other type takes the attribute path. */
typedef struct {
    PyTypeObject *type;  /* held: the offsets are this type's */
    Py_ssize_t alive, state, last_seen;
} Slots;

static Slots slots;
static PyTypeObject *not_slots;  /* a type seen without them (borrowed: compared only) */

static Py_ssize_t slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY))
            offset = member->offset;
    }
    Py_DECREF(descr);
    return offset;
}

/* The slots of ``session``'s type, or NULL: take the attribute path. */
static const Slots *slots_of(PyObject *session)
{
    PyTypeObject *type = Py_TYPE(session);
    if (slots.type == type)
        return &slots;
    if (slots.type != NULL || type == not_slots)
        return NULL;  /* one Session type per process: another is not cached */
    Slots found = {type, slot_offset(type, str_alive), slot_offset(type, str_state),
                   slot_offset(type, str_last_seen)};
    if (found.alive < 0 || found.state < 0 || found.last_seen < 0) {
        not_slots = type;
        return NULL;
    }
    Py_INCREF(type);
    slots = found;
    return &slots;
}

/* ``object``'s attribute ``name`` (a new reference): from its slot at ``offset`` when its
 * type has one (-1: none) and the slot is set, else by name (which raises when unset). */
static PyObject *slot_or_attr(PyObject *object, Py_ssize_t offset, PyObject *name)
{
    PyObject *value = offset >= 0 ? *(PyObject **)((char *)object + offset) : NULL;
    return value != NULL ? Py_NewRef(value) : PyObject_GetAttr(object, name);
}

/* A session that may still be translated by its template: alive, and for TCP established
 * (a plain segment in any other state may move FlowTable.touch_tcp's state machine). */
static int session_usable(PyObject *session, int proto, PyObject *established)
{
    const Slots *at = slots_of(session);
    PyObject *alive = slot_or_attr(session, at != NULL ? at->alive : -1, str_alive);
    if (alive == NULL)
        return -1;
    int usable = alive == Py_True;
    Py_DECREF(alive);
    if (!usable || proto != PROTO_TCP)
        return usable;
    PyObject *state = slot_or_attr(session, at != NULL ? at->state : -1, str_state);
    if (state == NULL)
        return -1;
    usable = state == established ? 1 : PyObject_RichCompareBool(state, established, Py_EQ);
    Py_DECREF(state);
    return usable;
}

/* fast_v6_to_v4 for one packet: the IPv4 packet, Py_None when the Python path must decide,
 * NULL on error. ``p`` is the IPv6 packet (no extension header, next header ``proto``). */
static PyObject *v6_to_v4(const uint8_t *p, Py_ssize_t n, int proto, PyObject *template,
                          unsigned ident, long df_threshold)
{
    unsigned plen = get16(p + 4), hop_limit = p[7], old_csum, zero;
    if (40 + (Py_ssize_t)plen != n || hop_limit <= 1)
        Py_RETURN_NONE;
    if (proto == PROTO_UDP) {
        if (plen < 8)
            Py_RETURN_NONE;
        old_csum = get16(p + 46);
        if (old_csum == 0 || get16(p + 44) != plen)
            Py_RETURN_NONE;
        zero = 0xFFFF;
    } else {
        if (plen < 20)
            Py_RETURN_NONE;
        unsigned data_offset = (unsigned)(p[52] >> 4) * 4;
        if (p[53] & TCP_SYN_FIN_RST || data_offset < 20 || data_offset > plen)
            Py_RETURN_NONE;
        old_csum = get16(p + 56);
        zero = 0;
    }
    /* (session, sum6, addr4, delta, addresses): fastpath.inbound_template */
    long sum6 = PyLong_AsLong(PyTuple_GET_ITEM(template, 1));
    long addr4 = PyLong_AsLong(PyTuple_GET_ITEM(template, 2));
    long delta = PyLong_AsLong(PyTuple_GET_ITEM(template, 3));
    PyObject *addresses = PyTuple_GET_ITEM(template, 4);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(addresses) || PyBytes_GET_SIZE(addresses) != 12) {
        PyErr_SetString(PyExc_ValueError, "template addresses must be 12 bytes");
        return NULL;
    }
    uint32_t value = sum_mod(p + 40, plen);
    if (mod_ffff((long long)sum6 + plen + value))
        Py_RETURN_NONE;
    long rest = mod_ffff((long long)delta - old_csum);
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : zero;
    unsigned total_len = 20 + plen;
    unsigned flags_offset = (long)total_len > df_threshold ? IPV4_DF : 0;
    unsigned tos = (unsigned)(p[0] & 0x0F) << 4 | p[1] >> 4;
    unsigned ttl = hop_limit - 1;
    rest = mod_ffff(0x4500LL + tos + total_len + ident + flags_offset + (ttl << 8) + addr4);
    unsigned header_csum = rest ? 0xFFFF - (unsigned)rest : 0;

    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total_len);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *a = (const uint8_t *)PyBytes_AS_STRING(addresses);
    o[0] = 0x45;
    o[1] = (uint8_t)tos;
    put16(o + 2, total_len);
    put16(o + 4, ident);
    put16(o + 6, flags_offset);
    o[8] = (uint8_t)ttl;
    o[9] = (uint8_t)proto;
    put16(o + 10, header_csum);
    memcpy(o + 12, a, 12);  /* pool4, target4, pool port, target port */
    memcpy(o + 24, p + 44, plen - 4);
    put16(o + (proto == PROTO_UDP ? 26 : 36), csum);
    return out;
}

/* fast_v4_to_v6 for one packet (20-byte IPv4 header): the IPv6 packet, Py_None, or NULL. */
static PyObject *v4_to_v6(const uint8_t *p, Py_ssize_t n, int proto, PyObject *template,
                          long mtu)
{
    unsigned total_len = get16(p + 2), ttl = p[8], old_csum, zero;
    if ((Py_ssize_t)total_len != n || ttl <= 1 || get16(p + 6) & IPV4_MF_OFFSET)
        Py_RETURN_NONE;
    unsigned seglen = total_len - 20;
    if (40 + (long)seglen > mtu)
        Py_RETURN_NONE;
    if (proto == PROTO_UDP) {
        if (seglen < 8)
            Py_RETURN_NONE;
        old_csum = get16(p + 26);
        zero = 0xFFFF;
    } else {
        if (seglen < 20)
            Py_RETURN_NONE;
        unsigned data_offset = (unsigned)(p[32] >> 4) * 4;
        if (p[33] & TCP_SYN_FIN_RST || data_offset < 20 || data_offset > seglen)
            Py_RETURN_NONE;
        old_csum = get16(p + 36);
        zero = 0;
    }
    if (sum_mod(p, 20))
        Py_RETURN_NONE;
    /* (session, delta, outer, addresses): fastpath.return_template */
    long delta = PyLong_AsLong(PyTuple_GET_ITEM(template, 1));
    PyObject *addresses = PyTuple_GET_ITEM(template, 3);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(addresses) || PyBytes_GET_SIZE(addresses) != 36) {
        PyErr_SetString(PyExc_ValueError, "template addresses must be 36 bytes");
        return NULL;
    }
    uint32_t value = sum_mod(p + 20, seglen);
    long rest = mod_ffff((long long)value - old_csum + delta + seglen);
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : zero;

    PyObject *out = PyBytes_FromStringAndSize(NULL, 40 + (Py_ssize_t)seglen);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    o[0] = 0x60 | p[1] >> 4;
    o[1] = (uint8_t)(p[1] << 4);
    o[2] = o[3] = 0;
    put16(o + 4, seglen);
    o[6] = (uint8_t)proto;
    o[7] = (uint8_t)(ttl - 1);
    memcpy(o + 8, PyBytes_AS_STRING(addresses), 36);  /* gw6, client6, gw port, client port */
    memcpy(o + 44, p + 24, seglen - 4);
    put16(o + (proto == PROTO_UDP ? 46 : 56), csum);
    return out;
}

/* fast_echo_v6_to_v4 for one packet (an ICMPv6 message right after the IPv6 header): the
 * ICMPv4 Echo Request, Py_None, or NULL. The template is fastpath.echo_inbound_template's. */
static PyObject *echo_v6_to_v4(const uint8_t *p, Py_ssize_t n, PyObject *template,
                               unsigned ident, long df_threshold)
{
    unsigned plen = get16(p + 4), hop_limit = p[7];
    if (40 + (Py_ssize_t)plen != n || hop_limit <= 1 || plen < 8 || p[40] != ICMPV6_ECHO_REQUEST)
        Py_RETURN_NONE;
    long sum6 = PyLong_AsLong(PyTuple_GET_ITEM(template, 1));
    long addr4 = PyLong_AsLong(PyTuple_GET_ITEM(template, 2));
    long delta = PyLong_AsLong(PyTuple_GET_ITEM(template, 3));
    PyObject *addresses = PyTuple_GET_ITEM(template, 4);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(addresses) || PyBytes_GET_SIZE(addresses) != 12) {
        PyErr_SetString(PyExc_ValueError, "template addresses must be 12 bytes");
        return NULL;
    }
    uint32_t value = sum_mod(p + 40, plen);
    if (mod_ffff((long long)sum6 + plen + value))
        Py_RETURN_NONE;
    long rest = mod_ffff((long long)value - get16(p + 42) + delta);
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : 0;
    unsigned total_len = 20 + plen;
    unsigned flags_offset = (long)total_len > df_threshold ? IPV4_DF : 0;
    unsigned tos = (unsigned)(p[0] & 0x0F) << 4 | p[1] >> 4;
    unsigned ttl = hop_limit - 1;
    rest = mod_ffff(0x4500LL + tos + total_len + ident + flags_offset + (ttl << 8) + addr4);
    unsigned header_csum = rest ? 0xFFFF - (unsigned)rest : 0;

    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total_len);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *a = (const uint8_t *)PyBytes_AS_STRING(addresses);
    o[0] = 0x45;
    o[1] = (uint8_t)tos;
    put16(o + 2, total_len);
    put16(o + 4, ident);
    put16(o + 6, flags_offset);
    o[8] = (uint8_t)ttl;
    o[9] = PROTO_ICMP;
    put16(o + 10, header_csum);
    memcpy(o + 12, a, 8);  /* pool4, target4 */
    o[20] = ICMP_ECHO_REQUEST;
    o[21] = p[41];
    put16(o + 22, csum);
    memcpy(o + 24, a + 8, 2);  /* the pool's identifier */
    memcpy(o + 26, p + 46, plen - 6);
    return out;
}

/* fast_echo_v4_to_v6 for one packet (20-byte IPv4 header, protocol 1): the ICMPv6 Echo
 * Reply, Py_None, or NULL. The template is fastpath.echo_return_template's. */
static PyObject *echo_v4_to_v6(const uint8_t *p, Py_ssize_t n, PyObject *template, long mtu)
{
    unsigned total_len = get16(p + 2), ttl = p[8];
    if ((Py_ssize_t)total_len != n || ttl <= 1 || get16(p + 6) & IPV4_MF_OFFSET)
        Py_RETURN_NONE;
    unsigned seglen = total_len - 20;
    if (seglen < 8 || 40 + (long)seglen > mtu || p[20] != ICMP_ECHO_REPLY)
        Py_RETURN_NONE;
    if (sum_mod(p, 20))
        Py_RETURN_NONE;
    uint32_t value = sum_mod(p + 20, seglen);
    if (value)
        Py_RETURN_NONE;
    long delta = PyLong_AsLong(PyTuple_GET_ITEM(template, 1));
    PyObject *addresses = PyTuple_GET_ITEM(template, 3);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(addresses) || PyBytes_GET_SIZE(addresses) != 36) {
        PyErr_SetString(PyExc_ValueError, "template addresses must be 36 bytes");
        return NULL;
    }
    long rest = mod_ffff((long long)value - get16(p + 22) + delta + seglen);
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : 0;

    PyObject *out = PyBytes_FromStringAndSize(NULL, 40 + (Py_ssize_t)seglen);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *a = (const uint8_t *)PyBytes_AS_STRING(addresses);
    o[0] = 0x60 | p[1] >> 4;
    o[1] = (uint8_t)(p[1] << 4);
    o[2] = o[3] = 0;
    put16(o + 4, seglen);
    o[6] = PROTO_ICMPV6;
    o[7] = (uint8_t)(ttl - 1);
    memcpy(o + 8, a, 32);  /* gw6, client6 */
    o[40] = ICMPV6_ECHO_REPLY;
    o[41] = p[21];
    put16(o + 42, csum);
    memcpy(o + 44, a + 34, 2);  /* the client's identifier */
    memcpy(o + 46, p + 26, seglen - 6);
    return out;
}

/* The per-protocol template dicts of ``caches`` ({6: dict, 17: dict, and the echo's under
 * ``echo``: 58 inbound, 1 back}), looked up once per call, not per packet (borrowed: no
 * Python code runs while a loop holds them). A missing one is NULL. */
static int protocol_caches(PyObject *caches, int echo, PyObject **tcp, PyObject **udp,
                           PyObject **icmp)
{
    PyObject *numbers[3] = {PyLong_FromLong(PROTO_TCP), PyLong_FromLong(PROTO_UDP),
                            PyLong_FromLong(echo)};
    PyObject **found[3] = {tcp, udp, icmp};
    int failed = 0;
    for (int i = 0; i < 3; i++) {
        PyObject *cache = numbers[i] == NULL ? NULL
                          : PyDict_GetItemWithError(caches, numbers[i]);
        *found[i] = cache != NULL && PyDict_Check(cache) ? cache : NULL;
        failed |= numbers[i] == NULL || PyErr_Occurred() != NULL;
        Py_XDECREF(numbers[i]);
    }
    return failed ? -1 : 0;
}

/* Count one translated packet: totals[0..2] UDP (packets, bytes in, out), [3..5] TCP,
 * [6..8] ICMP (an echo). */
static inline void count(Py_ssize_t *totals, int proto, Py_ssize_t in, Py_ssize_t out)
{
    Py_ssize_t *t = proto == PROTO_UDP ? totals
                    : proto == PROTO_TCP ? totals + 3 : totals + 6;
    t[0] += 1;
    t[1] += in;
    t[2] += out;
}

static int touch(PyObject *session, PyObject *now)
{
    const Slots *at = slots_of(session);
    if (at == NULL)
        return PyObject_SetAttr(session, str_last_seen, now);
    PyObject **slot = (PyObject **)((char *)session + at->last_seen);
    PyObject *old = *slot;
    *slot = Py_NewRef(now);
    Py_XDECREF(old);  /* a float: its deallocation runs no Python code */
    return 0;
}

/* (index, ident, then the ``count`` totals) */
static PyObject *result(Py_ssize_t index, unsigned long ident, const Py_ssize_t *t, int count)
{
    PyObject *out = PyTuple_New(2 + count);
    if (out == NULL)
        return NULL;
    PyObject *item = PyLong_FromSsize_t(index);
    if (item == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 0, item);
    item = PyLong_FromUnsignedLong(ident);
    if (item == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 1, item);
    for (int i = 0; i < count; i++) {
        item = PyLong_FromSsize_t(t[i]);
        if (item == NULL)
            goto fail;
        PyTuple_SET_ITEM(out, 2 + i, item);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* fast_echo_reply for a protocol-41 packet with a 20-byte outer header (a tunnel client's
 * echo request to us, keyed by the outer and inner addresses in ``echoes``, whose values are
 * fastpath.EchoTemplate): 1 when taken (answered to ``to_tunnel``, or refused by ``allow``,
 * the echo limit, which the full path asks at the same point), counted in t[0..3]
 * (requests, their bytes, replies, their bytes); 0 when Python must decide; -1 on error. */
static int echo_to_us(const uint8_t *p, Py_ssize_t size, PyObject *echoes, PyObject *allow,
                      PyObject *now, long mtu, PyObject *to_tunnel, Py_ssize_t *t)
{
    if (echoes == NULL || allow == NULL || size < 68)
        return 0;
    const uint8_t *q = p + 20;
    Py_ssize_t n = size - 20;
    unsigned plen = get16(q + 4);
    if (40 + (Py_ssize_t)plen != n || plen < 8 || q[40] != ICMPV6_ECHO_REQUEST || n > mtu)
        return 0;
    char key_bytes[40];
    memcpy(key_bytes, p + 12, 8);
    memcpy(key_bytes + 8, p + 28, 32);
    PyObject *key = PyBytes_FromStringAndSize(key_bytes, 40);
    if (key == NULL)
        return -1;
    PyObject *template = PyDict_GetItemWithError(echoes, key);
    Py_DECREF(key);
    if (template == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(template) || PyTuple_GET_SIZE(template) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(template, 1))) {
        PyErr_SetString(PyExc_ValueError, "echo template must be (int, bytes)");
        return -1;
    }
    long sum6 = PyLong_AsLong(PyTuple_GET_ITEM(template, 0));
    if (sum6 == -1 && PyErr_Occurred())
        return -1;
    uint32_t value = sum_mod(q + 40, plen);
    if (mod_ffff((long long)sum6 + plen + value))
        return 0;
    /* Python code runs in ``allow``: hold what is used after it. */
    PyObject *outer4 = Py_NewRef(PyTuple_GET_ITEM(template, 1));
    PyObject *src = PyBytes_FromStringAndSize((const char *)q + 8, 16);
    PyObject *verdict = src == NULL ? NULL
                        : PyObject_CallFunctionObjArgs(allow, src, now, NULL);
    Py_XDECREF(src);
    int allowed = verdict == NULL ? -1 : PyObject_IsTrue(verdict);
    Py_XDECREF(verdict);
    if (allowed < 0) {
        Py_DECREF(outer4);
        return -1;
    }
    t[0] += 1;
    t[1] += n;
    if (!allowed) {
        Py_DECREF(outer4);
        return 1;
    }
    long rest = mod_ffff((long long)value - get16(q + 42)
                         - (long long)((ICMPV6_ECHO_REQUEST << 8) | q[41])
                         + (ICMPV6_ECHO_REPLY << 8) + sum6 + plen);
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        Py_DECREF(outer4);
        return -1;
    }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    o[0] = 0x60;
    o[1] = o[2] = o[3] = 0;
    put16(o + 4, plen);
    o[6] = PROTO_ICMPV6;
    o[7] = ECHO_REPLY_HOP_LIMIT;
    memcpy(o + 8, q + 24, 16);  /* from the address it was sent to */
    memcpy(o + 24, q + 8, 16);
    o[40] = ICMPV6_ECHO_REPLY;
    o[41] = 0;
    put16(o + 42, csum);
    memcpy(o + 44, q + 44, plen - 4);  /* identifier, sequence, data */
    PyObject *pair = PyTuple_Pack(2, out, outer4);
    int failed = pair == NULL || PyList_Append(to_tunnel, pair) < 0;
    Py_XDECREF(pair);
    Py_DECREF(out);
    Py_DECREF(outer4);
    if (failed)
        return -1;
    t[2] += 1;
    t[3] += n;
    return 1;
}

/* A TCP SYN or UDP datagram that may open a session (``p``: its IPv6 packet, ``n`` bytes):
 * what the full path checks before it looks a session up (datapath._inbound_transport: no
 * padding, hop limit above 1, the segment's lengths, a UDP checksum not zero, the checksum
 * verified over the IPv6 pseudo-header, RFC 8200 §8.1), so that the packet it opens a
 * session for is translated as it is. 1: it may; 0: Python decides. */
static int may_open(const uint8_t *p, Py_ssize_t n, int proto)
{
    unsigned plen = get16(p + 4);
    if (40 + (Py_ssize_t)plen != n || p[7] <= 1 || plen > MAX_TRANSLATED_SEGMENT)
        return 0;
    if (proto == PROTO_UDP) {
        if (plen < 8 || get16(p + 44) != plen || get16(p + 46) == 0)
            return 0;
    } else {
        if (plen < 20)
            return 0;
        unsigned data_offset = (unsigned)(p[52] >> 4) * 4;
        if (!(p[53] & TCP_SYN) || data_offset < 20 || data_offset > plen)
            return 0;
    }
    long long sum6 = (long long)sum_mod(p + 8, 32) + proto;
    return mod_ffff(sum6 + plen + sum_mod(p + 40, plen)) == 0;
}

/* Where a SYN's MSS option's value lies in its segment (``end``: the data offset), or -1:
 * translate.clamp_mss's walk of the options (RFC 9293 §3.1), stopping where it stops. */
static long mss_at(const uint8_t *segment, unsigned end)
{
    unsigned offset = 20;
    while (offset < end) {
        unsigned kind = segment[offset];
        if (kind == 0)
            break;
        if (kind == 1) {
            offset += 1;
            continue;
        }
        if (offset + 1 >= end)
            break;
        unsigned length = segment[offset + 1];
        if (length < 2 || offset + length > end)
            break;
        if (kind == 2 && length == 4)
            return offset + 2;
        offset += length;
    }
    return -1;
}

/* What lowering a SYN's MSS option to ``max_mss`` adds to its checksum's sum (RFC 1624), and in
 * ``*at`` where the value lies in ``segment`` (-1: nothing to lower; ``end``: the data
 * offset). */
static long mss_clamp(const uint8_t *segment, unsigned end, long max_mss, long *at)
{
    *at = mss_at(segment, end);
    if (*at < 0 || (long)get16(segment + *at) <= max_mss) {
        *at = -1;
        return 0;
    }
    return max_mss - (long)get16(segment + *at);
}

/* A session's address attribute of ``size`` bytes (4 or 16) into ``to``, and its port
 * attribute into ``port``. */
static int session_address(PyObject *session, PyObject *name, uint8_t *to, Py_ssize_t size)
{
    PyObject *value = PyObject_GetAttr(session, name);
    if (value == NULL)
        return -1;
    int ok = PyBytes_Check(value) && PyBytes_GET_SIZE(value) == size;
    if (ok)
        memcpy(to, PyBytes_AS_STRING(value), (size_t)size);
    Py_DECREF(value);
    if (!ok)
        PyErr_Format(PyExc_ValueError, "a session's %U must be %zd bytes", name, size);
    return ok ? 0 : -1;
}

static int session_port(PyObject *session, PyObject *name, unsigned *port)
{
    PyObject *value = PyObject_GetAttr(session, name);
    if (value == NULL)
        return -1;
    long number = PyLong_AsLong(value);
    Py_DECREF(value);
    if (number == -1 && PyErr_Occurred())
        return -1;
    if (number < 0 || number > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "a session's port must be 0..65535");
        return -1;
    }
    *port = (unsigned)number;
    return 0;
}

/* translate.translate_v6_to_v4 of a packet ``may_open`` passed, for the session it opened:
 * the pool address and port for the client's, the target's for ours, a SYN's MSS lowered to
 * ``max_mss`` (RFC 9293 §3.7.1), the checksum by difference (RFC 1624 eqn. 3, as v6_to_v4)
 * and the IPv4 header of RFC 7915 §5.1. The new IPv4 packet, or NULL on error. */
static PyObject *open_v6_to_v4(const uint8_t *p, Py_ssize_t n, int proto, PyObject *session,
                               unsigned ident, long df_threshold, long max_mss)
{
    uint8_t addresses[8];
    unsigned pport, tport;
    if (session_address(session, str_pool4, addresses, 4) < 0
            || session_address(session, str_target4, addresses + 4, 4) < 0
            || session_port(session, str_pport, &pport) < 0
            || session_port(session, str_tport, &tport) < 0)
        return NULL;
    unsigned plen = (unsigned)(n - 40), hop_limit = p[7];
    unsigned csum_at = proto == PROTO_UDP ? 6 : 16;
    long long sum6 = (long long)sum_mod(p + 8, 32) + proto;
    long long addr4 = (long long)sum_mod(addresses, 8) + proto;
    long long delta = addr4 - sum6 + pport - get16(p + 40) + tport - get16(p + 42);
    long mss = -1;
    if (proto == PROTO_TCP)
        delta += mss_clamp(p + 40, (unsigned)(p[52] >> 4) * 4, max_mss, &mss);
    long rest = mod_ffff(delta - get16(p + 40 + csum_at));
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : proto == PROTO_UDP ? 0xFFFF : 0;
    unsigned total_len = 20 + plen;
    unsigned flags_offset = (long)total_len > df_threshold ? IPV4_DF : 0;
    unsigned tos = (unsigned)(p[0] & 0x0F) << 4 | p[1] >> 4;
    unsigned ttl = hop_limit - 1;
    rest = mod_ffff(0x4500LL + tos + total_len + ident + flags_offset + (ttl << 8) + addr4);
    unsigned header_csum = rest ? 0xFFFF - (unsigned)rest : 0;

    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total_len);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    o[0] = 0x45;
    o[1] = (uint8_t)tos;
    put16(o + 2, total_len);
    put16(o + 4, ident);
    put16(o + 6, flags_offset);
    o[8] = (uint8_t)ttl;
    o[9] = (uint8_t)proto;
    put16(o + 10, header_csum);
    memcpy(o + 12, addresses, 8);
    memcpy(o + 20, p + 40, plen);
    put16(o + 20, pport);
    put16(o + 22, tport);
    if (mss >= 0)
        put16(o + 20 + mss, (unsigned)max_mss);
    put16(o + 20 + csum_at, csum);
    return out;
}

/* A packet no template knows that ``may_open`` passed, handed to ``opener(packet, now)``
 * (datapath.Datapath._opened): translated to ``out`` with the session it returns (2, counted
 * in ``t``), taken there (True: 1, Python counted it), or left to Python (None: 0); -1 on
 * error. ``p`` is the IPv6 packet inside ``packet``. */
static int open_session(PyObject *packet, const uint8_t *p, Py_ssize_t n, int proto,
                        PyObject *opener, PyObject *now, unsigned ident, long df_threshold,
                        long max_mss, PyObject *out, Py_ssize_t *t)
{
    Py_INCREF(packet);  /* the opener runs Python code */
    PyObject *session = PyObject_CallFunctionObjArgs(opener, packet, now, NULL);
    int taken;
    if (session == NULL) {
        taken = -1;
    } else if (session == Py_None || session == Py_False) {
        taken = 0;
    } else if (session == Py_True) {
        taken = 1;
    } else {
        PyObject *translated = open_v6_to_v4(p, n, proto, session, ident, df_threshold,
                                             max_mss);
        taken = translated == NULL || PyList_Append(out, translated) < 0 ? -1 : 2;
        if (translated != NULL)
            count(t, proto, n, PyBytes_GET_SIZE(translated));
        Py_XDECREF(translated);
    }
    Py_XDECREF(session);
    Py_DECREF(packet);
    return taken;
}

PyDoc_STRVAR(inbound_doc,
"inbound(packets, start, caches, outer, ident, now, established, df_threshold, out,\n"
"        to_tunnel, echoes, allow, mtu, opener=None, max_mss=0)\n"
"Translate packets[start:] while they are plain packets of live sessions with an inbound\n"
"template, appending each IPv4 packet to ``out``. ``outer`` is 0 (IPv6 packets, key\n"
"packet[8:44]) or 20 (protocol-41 packets, key outer addresses + packet[28:64]).\n"
"An ICMPv6 Echo Request takes caches[58] (key packet[8:40] + identifier + 2 zero bytes).\n"
"With ``outer`` 20, an echo request to us is answered from ``echoes`` (None: never) to\n"
"``to_tunnel`` if ``allow(source, now)``, the echo limit, lets it.\n"
"A TCP SYN or UDP datagram no template knows, whose checks hold as far as the full path\n"
"checks before it looks a session up, goes to ``opener(packet, now)`` (None: never): the\n"
"session it returns translates it (a SYN's MSS lowered to ``max_mss``), True: taken there,\n"
"None: left to Python.\n"
"Returns (index of the first packet not taken, ident, udp packets, bytes in, bytes out,\n"
"tcp packets, bytes in, bytes out, icmp packets, bytes in, bytes out, echo requests to us,\n"
"their bytes, replies, their bytes).");

static PyObject *inbound(PyObject *self, PyObject *args)
{
    PyObject *packets, *caches, *now, *established, *out, *to_tunnel, *echoes, *allow;
    PyObject *opener = Py_None;
    Py_ssize_t start, outer;
    unsigned long ident;
    long df_threshold, mtu, max_mss = 0;
    if (!PyArg_ParseTuple(args, "O!nO!nkOOlO!O!OOl|Ol", &PyList_Type, &packets, &start,
                          &PyDict_Type, &caches, &outer, &ident, &now, &established,
                          &df_threshold, &PyList_Type, &out, &PyList_Type, &to_tunnel, &echoes,
                          &allow, &mtu, &opener, &max_mss))
        return NULL;
    if (opener == Py_None)
        opener = NULL;
    else if (!PyCallable_Check(opener) || max_mss < 0 || max_mss > 0xFFFF) {
        PyErr_SetString(PyExc_TypeError, "opener must be callable or None, max_mss 0..65535");
        return NULL;
    }
    if (echoes == Py_None || allow == Py_None)
        echoes = allow = NULL;
    else if (!PyDict_Check(echoes) || !PyCallable_Check(allow)) {
        PyErr_SetString(PyExc_TypeError, "echoes must be a dict and allow callable, or None");
        return NULL;
    }
    PyObject *tcp_cache, *udp_cache, *echo_cache;
    if (protocol_caches(caches, PROTO_ICMPV6, &tcp_cache, &udp_cache, &echo_cache) < 0)
        return NULL;
    Py_ssize_t totals[13] = {0}, i = start, count_all = PyList_GET_SIZE(packets);
    for (; i < count_all; i++) {
        PyObject *packet = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(packet))
            break;
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(packet);
        Py_ssize_t size = PyBytes_GET_SIZE(packet);
        PyObject *key;
        int proto;
        if (outer == 0) {
            if (size < 44 || p[0] >> 4 != 6)
                break;
            proto = p[6];
            if (proto == PROTO_ICMPV6) {  /* addresses, the identifier, 0 */
                if (size < 48)
                    break;
                key = PyBytes_FromStringAndSize(NULL, 36);
                if (key != NULL) {
                    char *k = PyBytes_AS_STRING(key);
                    memcpy(k, p + 8, 32);
                    memcpy(k + 32, p + 44, 2);
                    k[34] = k[35] = 0;
                }
            } else {
                key = PyBytes_FromStringAndSize((const char *)p + 8, 36);
            }
        } else {
            if (size < 64 || p[0] != 0x45 || p[9] != 41 || p[20] >> 4 != 6
                    || (Py_ssize_t)get16(p + 2) != size)
                break;
            proto = p[26];
            if (proto == PROTO_ICMPV6) {
                Py_INCREF(packet);  /* ``allow`` runs Python code */
                int taken = echo_to_us(p, size, echoes, allow, now, mtu, to_tunnel,
                                       totals + 9);
                Py_DECREF(packet);
                if (taken < 0)
                    return NULL;
                if (!taken)
                    break;
                continue;
            }
            key = PyBytes_FromStringAndSize(NULL, 44);
            if (key != NULL) {
                memcpy(PyBytes_AS_STRING(key), p + 12, 8);
                memcpy(PyBytes_AS_STRING(key) + 8, p + 28, 36);
            }
        }
        if (key == NULL)
            return NULL;
        if (proto != PROTO_UDP && proto != PROTO_TCP && (proto != PROTO_ICMPV6 || outer)) {
            Py_DECREF(key);
            break;
        }
        PyObject *cache = proto == PROTO_UDP ? udp_cache
                          : proto == PROTO_TCP ? tcp_cache : echo_cache;
        PyObject *template = cache == NULL ? NULL : PyDict_GetItemWithError(cache, key);
        Py_DECREF(key);
        if (PyErr_Occurred())
            return NULL;
        if (template == NULL && opener != NULL && proto != PROTO_ICMPV6
                && may_open(p + outer, size - outer, proto)) {
            unsigned next = (unsigned)((ident + 1) & 0xFFFF);
            int taken = open_session(packet, p + outer, size - outer, proto, opener, now, next,
                                     df_threshold, max_mss, out, totals);
            /* Python code ran: the caches are looked up again. */
            if (taken < 0 || protocol_caches(caches, PROTO_ICMPV6, &tcp_cache, &udp_cache,
                                             &echo_cache) < 0)
                return NULL;
            if (!taken)
                break;
            if (taken == 2)
                ident = next;
            continue;
        }
        if (template == NULL || !PyTuple_Check(template) || PyTuple_GET_SIZE(template) != 5)
            break;
        PyObject *session = PyTuple_GET_ITEM(template, 0);
        int usable = session_usable(session, proto, established);
        if (usable < 0)
            return NULL;
        if (!usable)
            break;
        unsigned next = (unsigned)((ident + 1) & 0xFFFF);
        PyObject *translated = proto == PROTO_ICMPV6
            ? echo_v6_to_v4(p, size, template, next, df_threshold)
            : v6_to_v4(p + outer, size - outer, proto, template, next, df_threshold);
        if (translated == NULL)
            return NULL;
        if (translated == Py_None) {
            Py_DECREF(translated);
            break;
        }
        int failed = PyList_Append(out, translated) < 0 || touch(session, now) < 0;
        count(totals, proto == PROTO_ICMPV6 ? PROTO_ICMP : proto, size - outer,
              PyBytes_GET_SIZE(translated));
        Py_DECREF(translated);
        if (failed)
            return NULL;
        ident = (ident + 1) & 0xFFFF;
    }
    return result(i, ident, totals, 13);
}

/* An IPv4 TCP/UDP packet from a service that may be a session's first answers (``p``,
 * ``n`` bytes): what the full path checks before it looks the session up and what a plain
 * translation needs (datapath._from_services_full: a 20-byte header whose checksum verifies,
 * not a fragment, the size the header says, TTL above 1, the segment's lengths, small
 * enough for the MTU: never Fragmentation Needed or IPv6 fragments). 1: it may. */
static int may_return(const uint8_t *p, Py_ssize_t n, int proto, long mtu)
{
    unsigned total_len = get16(p + 2);
    if ((Py_ssize_t)total_len != n || p[8] <= 1 || get16(p + 6) & IPV4_MF_OFFSET)
        return 0;
    unsigned seglen = total_len - 20;
    if (40 + (long)seglen > mtu || seglen < (proto == PROTO_UDP ? 8u : 20u))
        return 0;
    if (proto == PROTO_TCP) {
        unsigned data_offset = (unsigned)(p[32] >> 4) * 4;
        if (data_offset < 20 || data_offset > seglen)
            return 0;
    }
    return sum_mod(p, 20) == 0;
}

/* translate.translate_v4_to_v6 and the IPv6 header of datapath._emit for a packet
 * ``may_return`` passed, for its ``session``: our address and port for the service's, the
 * client's for the pool's, a SYN's MSS lowered to ``max_mss``, the checksum computed from
 * the segment (a local stack's may be partial), hop limit TTL - 1 (RFC 7915 §4.1). */
static PyObject *return_v4_to_v6(const uint8_t *p, Py_ssize_t n, int proto, PyObject *session,
                                 long max_mss)
{
    uint8_t addresses[32];
    unsigned gwport, cport;
    if (session_address(session, str_gw6, addresses, 16) < 0
            || session_address(session, str_client6, addresses + 16, 16) < 0
            || session_port(session, str_gwport, &gwport) < 0
            || session_port(session, str_cport, &cport) < 0)
        return NULL;
    unsigned seglen = (unsigned)(n - 20), ttl = p[8];
    unsigned csum_at = proto == PROTO_UDP ? 6 : 16;
    long long delta = (long long)sum_mod(addresses, 32) + proto + gwport - get16(p + 20)
                      + cport - get16(p + 22);
    long mss = -1;
    if (proto == PROTO_TCP && p[33] & TCP_SYN)
        delta += mss_clamp(p + 20, (unsigned)(p[32] >> 4) * 4, max_mss, &mss);
    long rest = mod_ffff((long long)sum_mod(p + 20, seglen) - get16(p + 20 + csum_at) + delta
                         + seglen);
    unsigned csum = rest ? 0xFFFF - (unsigned)rest : proto == PROTO_UDP ? 0xFFFF : 0;

    PyObject *out = PyBytes_FromStringAndSize(NULL, 40 + (Py_ssize_t)seglen);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    o[0] = 0x60 | p[1] >> 4;
    o[1] = (uint8_t)(p[1] << 4);
    o[2] = o[3] = 0;
    put16(o + 4, seglen);
    o[6] = (uint8_t)proto;
    o[7] = (uint8_t)(ttl - 1);
    memcpy(o + 8, addresses, 32);
    memcpy(o + 40, p + 20, seglen);
    put16(o + 40, gwport);
    put16(o + 42, cport);
    if (mss >= 0)
        put16(o + 40 + mss, (unsigned)max_mss);
    put16(o + 40 + csum_at, csum);
    return out;
}

/* A packet no template knows that ``may_return`` passed, handed to
 * ``returner(packet, now)`` (datapath.Datapath._returned): translated with the (session,
 * outer) it returns, to ``to_tunnel`` as (packet, outer) or, outer b"", to ``to_ipv6``
 * (1, counted in ``t``), taken there (True: 1, Python counted it) or left to Python (None:
 * 0); -1 on error. */
static int first_return(PyObject *packet, int proto, PyObject *returner, PyObject *now,
                        long max_mss, PyObject *to_tunnel, PyObject *to_ipv6, Py_ssize_t *t)
{
    Py_INCREF(packet);  /* the returner runs Python code */
    PyObject *found = PyObject_CallFunctionObjArgs(returner, packet, now, NULL);
    int taken = found == NULL ? -1 : found == Py_True ? 1 : 0;
    if (found != NULL && found != Py_None && found != Py_True) {
        PyObject *outer;
        if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2
                || !PyBytes_Check(outer = PyTuple_GET_ITEM(found, 1))) {
            PyErr_SetString(PyExc_TypeError, "the returner gives (session, outer) or None");
            taken = -1;
        } else {
            PyObject *translated = return_v4_to_v6(
                (const uint8_t *)PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet), proto,
                PyTuple_GET_ITEM(found, 0), max_mss);
            if (translated == NULL) {
                taken = -1;
            } else if (PyBytes_GET_SIZE(outer)) {
                PyObject *pair = PyTuple_Pack(2, translated, outer);
                taken = pair == NULL || PyList_Append(to_tunnel, pair) < 0 ? -1 : 1;
                Py_XDECREF(pair);
            } else {
                taken = PyList_Append(to_ipv6, translated) < 0 ? -1 : 1;
            }
            if (taken == 1)
                count(t, proto, PyBytes_GET_SIZE(packet), PyBytes_GET_SIZE(translated));
            Py_XDECREF(translated);
        }
    }
    Py_XDECREF(found);
    Py_DECREF(packet);
    return taken;
}

PyDoc_STRVAR(returning_doc,
"returning(packets, start, caches, mtu, now, established, to_tunnel, to_ipv6,\n"
"          returner=None, max_mss=0)\n"
"Translate packets[start:] (IPv4 from the services) while they are plain packets of live\n"
"sessions with a return template: (packet, outer) to ``to_tunnel`` for a tunnel client,\n"
"the packet to ``to_ipv6`` for a NAT64 client on this host's side. An ICMPv4 Echo Reply\n"
"takes caches[1] (key packet[12:20] + 2 zero bytes + identifier). A TCP/UDP packet no\n"
"template knows, whose checks hold as far as the full path checks before it looks a\n"
"session up, goes to ``returner(packet, now)`` (None: never): translated with the\n"
"(session, outer) it returns (a SYN's MSS lowered to ``max_mss``), True: taken there,\n"
"None: left to Python.\n"
"Returns like inbound, with ident 0.");

static PyObject *returning(PyObject *self, PyObject *args)
{
    PyObject *packets, *caches, *now, *established, *to_tunnel, *to_ipv6;
    PyObject *returner = Py_None;
    Py_ssize_t start;
    long mtu, max_mss = 0;
    if (!PyArg_ParseTuple(args, "O!nO!lOOO!O!|Ol", &PyList_Type, &packets, &start, &PyDict_Type,
                          &caches, &mtu, &now, &established, &PyList_Type, &to_tunnel,
                          &PyList_Type, &to_ipv6, &returner, &max_mss))
        return NULL;
    if (returner == Py_None)
        returner = NULL;
    else if (!PyCallable_Check(returner) || max_mss < 0 || max_mss > 0xFFFF) {
        PyErr_SetString(PyExc_TypeError, "returner must be callable or None, max_mss 0..65535");
        return NULL;
    }
    PyObject *tcp_cache, *udp_cache, *echo_cache;
    if (protocol_caches(caches, PROTO_ICMP, &tcp_cache, &udp_cache, &echo_cache) < 0)
        return NULL;
    Py_ssize_t totals[9] = {0}, i = start, count_all = PyList_GET_SIZE(packets);
    for (; i < count_all; i++) {
        PyObject *packet = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(packet))
            break;
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(packet);
        Py_ssize_t size = PyBytes_GET_SIZE(packet);
        if (size < 28 || p[0] != 0x45)
            break;
        int proto = p[9];
        if (proto != PROTO_UDP && proto != PROTO_TCP && proto != PROTO_ICMP)
            break;
        PyObject *key;
        if (proto == PROTO_ICMP) {  /* addresses, 0, the identifier */
            key = PyBytes_FromStringAndSize(NULL, 12);
            if (key != NULL) {
                char *k = PyBytes_AS_STRING(key);
                memcpy(k, p + 12, 8);
                k[8] = k[9] = 0;
                memcpy(k + 10, p + 24, 2);
            }
        } else {
            key = PyBytes_FromStringAndSize((const char *)p + 12, 12);
        }
        if (key == NULL)
            return NULL;
        PyObject *cache = proto == PROTO_UDP ? udp_cache
                          : proto == PROTO_TCP ? tcp_cache : echo_cache;
        PyObject *template = cache == NULL ? NULL : PyDict_GetItemWithError(cache, key);
        Py_DECREF(key);
        if (PyErr_Occurred())
            return NULL;
        if (template == NULL && returner != NULL && proto != PROTO_ICMP
                && may_return(p, size, proto, mtu)) {
            int taken = first_return(packet, proto, returner, now, max_mss, to_tunnel, to_ipv6,
                                     totals);
            /* Python code ran: the caches are looked up again. */
            if (taken < 0 || protocol_caches(caches, PROTO_ICMP, &tcp_cache, &udp_cache,
                                             &echo_cache) < 0)
                return NULL;
            if (!taken)
                break;
            continue;
        }
        if (template == NULL || !PyTuple_Check(template) || PyTuple_GET_SIZE(template) != 4)
            break;
        PyObject *session = PyTuple_GET_ITEM(template, 0);
        PyObject *outer4 = PyTuple_GET_ITEM(template, 2);
        int usable = session_usable(session, proto, established);
        if (usable < 0)
            return NULL;
        if (!usable || !PyBytes_Check(outer4))
            break;
        PyObject *translated = proto == PROTO_ICMP ? echo_v4_to_v6(p, size, template, mtu)
                                                   : v4_to_v6(p, size, proto, template, mtu);
        if (translated == NULL)
            return NULL;
        if (translated == Py_None) {
            Py_DECREF(translated);
            break;
        }
        int failed;
        if (PyBytes_GET_SIZE(outer4)) {
            PyObject *pair = PyTuple_Pack(2, translated, outer4);
            failed = pair == NULL || PyList_Append(to_tunnel, pair) < 0;
            Py_XDECREF(pair);
        } else {
            failed = PyList_Append(to_ipv6, translated) < 0;
        }
        failed = failed || touch(session, now) < 0;
        count(totals, proto, size, PyBytes_GET_SIZE(translated));
        Py_DECREF(translated);
        if (failed)
            return NULL;
    }
    return result(i, 0, totals, 9);
}

/* --- the CLAT's plain packets (workers/engine/clat.py plain_to_ipv6, plain_to_ipv4) --- */

/* A sum the CLAT remembered (a Python int of any size, clat._address_sum): its value modulo
 * 0xffff, and whether it is exactly ``small`` (which needs the whole value). */
typedef struct {
    long mod;
    int fits;
    long long exact;
} Sum;

static int sum_item(PyObject *tuple, Py_ssize_t index, Sum *out)
{
    PyObject *value = PyTuple_GET_ITEM(tuple, index);
    int overflow = 0;
    out->exact = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (out->exact == -1 && PyErr_Occurred())
        return -1;
    out->fits = !overflow;
    if (out->fits) {
        out->mod = mod_ffff(out->exact);
        return 0;
    }
    PyObject *modulus = PyLong_FromLong(0xFFFF);
    PyObject *rest = modulus == NULL ? NULL : PyNumber_Remainder(value, modulus);
    Py_XDECREF(modulus);
    if (rest == NULL)
        return -1;
    out->mod = PyLong_AsLong(rest);  /* Python's % of 0xffff: 0 .. 0xfffe */
    Py_DECREF(rest);
    return out->mod == -1 && PyErr_Occurred() ? -1 : 0;
}

/* packet.fold / fold_udp of RFC 1624 eqn 3 in sum form: clat._checksum_after(old, delta). A
 * sum congruent to 0 is sent as 0 unless it is exactly 0 (then 0xffff), as ``fold`` does. */
static unsigned checksum_after(unsigned old, const Sum *delta, int udp)
{
    long rest = mod_ffff(0xFFFFLL - old + delta->mod);
    int exactly_zero = delta->fits && delta->exact == (long long)old - 0xFFFF;
    unsigned folded = rest ? 0xFFFF - (unsigned)rest : (exactly_zero ? 0xFFFF : 0);
    return udp && folded == 0 ? 0xFFFF : folded;
}

/* plain_to_ipv6 for one packet: bytes, Py_None (the Python path decides), NULL on error. */
static PyObject *clat_to_ipv6(const uint8_t *p, Py_ssize_t n, PyObject *out_cache,
                              const uint8_t *address4, const uint8_t *address6)
{
    if (n < 28 || p[0] != 0x45 || p[8] <= 1)
        Py_RETURN_NONE;
    int proto = p[9];
    Py_ssize_t csum;
    if (proto == PROTO_UDP)
        csum = 26;
    else if (proto == PROTO_TCP && n >= 40)
        csum = 36;
    else
        Py_RETURN_NONE;
    if (memcmp(p + 12, address4, 4) != 0 || (Py_ssize_t)get16(p + 2) != n || sum_mod(p, 20))
        Py_RETURN_NONE;
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + 16, 4);
    if (key == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(out_cache, key);  /* (dst6, delta) */
    Py_DECREF(key);
    if (entry == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    PyObject *dst6 = PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2
                     ? PyTuple_GET_ITEM(entry, 0) : NULL;
    Sum delta;
    if (dst6 == NULL || !PyBytes_Check(dst6) || PyBytes_GET_SIZE(dst6) != 16) {
        PyErr_SetString(PyExc_ValueError, "CLAT cache entry must be (16 bytes, int)");
        return NULL;
    }
    if (sum_item(entry, 1, &delta) < 0)
        return NULL;
    unsigned flags_offset = get16(p + 6), offset = (flags_offset & 0x1FFF) * 8;
    int fragmented = (flags_offset & IPV4_MF_OFFSET) != 0;
    unsigned new_csum = 0;
    if (!fragmented || offset == 0) {
        unsigned old = get16(p + csum);
        if (old == 0 && proto == PROTO_UDP)
            Py_RETURN_NONE;  /* RFC 7915 §4.5: to_ipv6 decides */
        new_csum = checksum_after(old, &delta, proto == PROTO_UDP);
    }
    Py_ssize_t extra = fragmented ? 8 : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n - 20 + 40 + extra);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    o[0] = 0x60 | p[1] >> 4;
    o[1] = (uint8_t)(p[1] << 4);
    o[2] = o[3] = 0;
    put16(o + 4, (unsigned)(n - 20 + extra));
    o[6] = fragmented ? 44 : (uint8_t)proto;
    o[7] = (uint8_t)(p[8] - 1);
    memcpy(o + 8, address6, 16);
    memcpy(o + 24, PyBytes_AS_STRING(dst6), 16);
    if (fragmented) {  /* RFC 7915 §5.1.1: the Fragment header keeps the identification */
        o[40] = (uint8_t)proto;
        o[41] = 0;
        put16(o + 42, offset | (flags_offset >> 13 & 1));
        o[44] = o[45] = 0;
        o[46] = p[4];
        o[47] = p[5];
    }
    memcpy(o + 40 + extra, p + 20, n - 20);
    if (!fragmented || offset == 0)
        put16(o + 40 + extra + (csum - 20), new_csum);
    return out;
}

/* plain_to_ipv4 for one packet: bytes, Py_None, or NULL. */
static PyObject *clat_to_ipv4(const uint8_t *p, Py_ssize_t n, PyObject *in_cache,
                              const uint8_t *address4, const uint8_t *address6,
                              long df_threshold)
{
    if (n < 48 || p[0] >> 4 != 6 || p[7] <= 1)
        Py_RETURN_NONE;
    int proto = p[6];
    Py_ssize_t csum;
    if (proto == PROTO_UDP)
        csum = 46;
    else if (proto == PROTO_TCP && n >= 60)
        csum = 56;
    else
        Py_RETURN_NONE;
    unsigned payload_len = get16(p + 4);
    if (40 + (Py_ssize_t)payload_len != n || memcmp(p + 24, address6, 16) != 0)
        Py_RETURN_NONE;
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + 8, 16);
    if (key == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(in_cache, key);  /* (remote4, pseudo, delta) */
    Py_DECREF(key);
    if (entry == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    PyObject *remote4 = PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 3
                        ? PyTuple_GET_ITEM(entry, 0) : NULL;
    Sum pseudo, delta;
    if (remote4 == NULL || !PyBytes_Check(remote4) || PyBytes_GET_SIZE(remote4) != 4) {
        PyErr_SetString(PyExc_ValueError, "CLAT cache entry must be (4 bytes, int, int)");
        return NULL;
    }
    if (sum_item(entry, 1, &pseudo) < 0 || sum_item(entry, 2, &delta) < 0)
        return NULL;
    /* RFC 8200 §8.1: the checksum must verify. */
    if (mod_ffff((long long)pseudo.mod + proto + payload_len + sum_mod(p + 40, payload_len)))
        Py_RETURN_NONE;
    unsigned new_csum = checksum_after(get16(p + csum), &delta, proto == PROTO_UDP);
    unsigned length = 20 + payload_len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    o[0] = 0x45;
    o[1] = (uint8_t)((p[0] & 0x0F) << 4 | p[1] >> 4);
    put16(o + 2, length);
    put16(o + 4, 0);
    put16(o + 6, (long)length > df_threshold ? IPV4_DF : 0);
    o[8] = (uint8_t)(p[7] - 1);
    o[9] = (uint8_t)proto;
    put16(o + 10, 0);
    memcpy(o + 12, PyBytes_AS_STRING(remote4), 4);
    memcpy(o + 16, address4, 4);
    uint32_t header_sum = sum_mod(o, 20);
    put16(o + 10, header_sum ? 0xFFFF - header_sum : 0);
    memcpy(o + 20, p + 40, payload_len);
    put16(o + 20 + (csum - 40), new_csum);
    return out;
}

PyDoc_STRVAR(clat_doc,
"clat(packets, start, out_cache, in_cache, address4, address6, df_threshold, out)\n"
"The CLAT's plain packets from packets[start:] (the host's IPv4 and the PLAT's IPv6 mixed,\n"
"as the device gives them) with the remembered remote addresses, appended to ``out``, up\n"
"to the first one the Python path must handle. Returns (index, 0 (no ident: like\n"
"returning), then packets, bytes in, bytes out for: IPv4 UDP, IPv4 TCP, IPv6 UDP, IPv6 TCP).");

static PyObject *clat(PyObject *self, PyObject *args)
{
    PyObject *packets, *out_cache, *in_cache, *out;
    Py_ssize_t start, len4, len6;
    const char *address4, *address6;
    long df_threshold;
    if (!PyArg_ParseTuple(args, "O!nO!O!y#y#lO!", &PyList_Type, &packets, &start,
                          &PyDict_Type, &out_cache, &PyDict_Type, &in_cache, &address4, &len4,
                          &address6, &len6, &df_threshold, &PyList_Type, &out))
        return NULL;
    if (len4 != 4 || len6 != 16) {
        PyErr_SetString(PyExc_ValueError, "address4 must be 4 bytes, address6 16");
        return NULL;
    }
    Py_ssize_t totals[12] = {0}, i = start, count_all = PyList_GET_SIZE(packets);
    for (; i < count_all; i++) {
        PyObject *packet = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(packet) || PyBytes_GET_SIZE(packet) == 0)
            break;
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(packet);
        Py_ssize_t size = PyBytes_GET_SIZE(packet);
        int version = p[0] >> 4;
        PyObject *translated;
        if (version == 4)
            translated = clat_to_ipv6(p, size, out_cache, (const uint8_t *)address4,
                                      (const uint8_t *)address6);
        else if (version == 6)
            translated = clat_to_ipv4(p, size, in_cache, (const uint8_t *)address4,
                                      (const uint8_t *)address6, df_threshold);
        else
            break;
        if (translated == NULL)
            return NULL;
        if (translated == Py_None) {
            Py_DECREF(translated);
            break;
        }
        int failed = PyList_Append(out, translated) < 0;
        int proto = version == 4 ? p[9] : p[6];
        Py_ssize_t *t = totals + (version == 4 ? 0 : 6) + (proto == PROTO_UDP ? 0 : 3);
        t[0] += 1;
        t[1] += size;
        t[2] += PyBytes_GET_SIZE(translated);
        Py_DECREF(translated);
        if (failed)
            return NULL;
    }
    return Py_BuildValue("(nknnnnnnnnnnnn)", i, 0UL, totals[0], totals[1], totals[2], totals[3],
                         totals[4], totals[5], totals[6], totals[7], totals[8], totals[9],
                         totals[10], totals[11]);
}

PyDoc_STRVAR(untrack_doc,
"untrack(object)\n"
"Take ``object`` out of the cyclic garbage collector's lists; reference counting still frees\n"
"it. Only for objects that can never be part of a reference cycle: the flow table's\n"
"sessions and bindings, which hold bytes, numbers and strings (a dict of them, for a\n"
"binding's remotes). A full collection walks every tracked object: with a million\n"
"sessions tracked, each was a pause of about half a second (issue 21).");

static PyObject *untrack(PyObject *self, PyObject *object)
{
    if (PyObject_GC_IsTracked(object))
        PyObject_GC_UnTrack(object);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"untrack", untrack, METH_O, untrack_doc},
    {"inbound", inbound, METH_VARARGS, inbound_doc},
    {"returning", returning, METH_VARARGS, returning_doc},
    {"clat", clat, METH_VARARGS, clat_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "The fast path's batch loops in C (workers/engine/fastpath.py has the rules).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    str_last_seen = PyUnicode_InternFromString("last_seen");
    str_alive = PyUnicode_InternFromString("alive");
    str_state = PyUnicode_InternFromString("state");
    str_pool4 = PyUnicode_InternFromString("pool4");
    str_target4 = PyUnicode_InternFromString("target4");
    str_pport = PyUnicode_InternFromString("pport");
    str_tport = PyUnicode_InternFromString("tport");
    str_gw6 = PyUnicode_InternFromString("gw6");
    str_client6 = PyUnicode_InternFromString("client6");
    str_gwport = PyUnicode_InternFromString("gwport");
    str_cport = PyUnicode_InternFromString("cport");
    if (str_last_seen == NULL || str_alive == NULL || str_state == NULL || str_pool4 == NULL
            || str_target4 == NULL || str_pport == NULL || str_tport == NULL || str_gw6 == NULL
            || str_client6 == NULL || str_gwport == NULL || str_cport == NULL)
        return NULL;
    return PyModule_Create(&module);
}
