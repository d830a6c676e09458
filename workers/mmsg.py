"""Batched datagram I/O: recvmmsg(2) and sendmmsg(2) through ctypes.

One system call moves up to a batch of packets, and received packets land in one
preallocated buffer instead of a fresh 64 KiB bytes object each (CPython's ``socket.recv``
allocates the requested size, then shrinks it). I/O shell: used by the coordinator's capture
loop and the workers' tunnel sends; the engine never sees it.

Received packets are memoryviews into the receiver's buffer, valid until its next
``receive``: the caller must be done with them (or copy them) by then.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

MSG_DONTWAIT = 0x40
_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_MMSG_SIZE = ctypes.sizeof(_Mmsghdr)
_MSG_LEN_AT = _Mmsghdr.msg_len.offset
_MSG_FLAGS_AT = _Msghdr.msg_flags.offset
_MSG_CONTROLLEN_AT = _Msghdr.msg_controllen.offset
# PACKET_AUXDATA (packet(7)): one control message per packet, struct tpacket_auxdata after a
# 16-byte cmsghdr; its first field is tp_status. CMSG_SPACE(20) = 40.
AUX_SPACE = 40
_AUX_STATUS_WORD = 16 // 4
TP_STATUS_CSUMNOTREADY = 0x8
_IOV_SIZE = ctypes.sizeof(_Iovec)
_IOV_LEN_AT = _Iovec.iov_len.offset
_MSG_TRUNC = 0x20
_MMSG_WORDS = _MMSG_SIZE // 4
_INT = struct.Struct("=i")
_SIZE = struct.Struct("@N")
# struct sockaddr_in: family, port (network order), address, zero padding
_SOCKADDR_IN = struct.Struct("=H2s4s8x")

_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p]
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]


def _messages(count: int, slot: int, names: bool) -> tuple[ctypes.Array[ctypes.c_ubyte],
                                                          ctypes.Array[_Iovec],
                                                          ctypes.Array[_Mmsghdr],
                                                          ctypes.Array[ctypes.c_ubyte]]:
    data = (ctypes.c_ubyte * (count * slot))()
    iovs = (_Iovec * count)()
    msgs = (_Mmsghdr * count)()
    sockaddrs = (ctypes.c_ubyte * (16 * count))()
    base = ctypes.addressof(data)
    for i in range(count):
        iovs[i].iov_base = base + i * slot
        iovs[i].iov_len = slot
        msgs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i])
        msgs[i].msg_hdr.msg_iovlen = 1
        if names:
            msgs[i].msg_hdr.msg_name = ctypes.addressof(sockaddrs) + 16 * i
            msgs[i].msg_hdr.msg_namelen = 16
    return data, iovs, msgs, sockaddrs


class BatchReceiver:
    """Reads up to ``batch`` datagrams per call from a non-blocking socket; with ``auxdata``
    (an AF_PACKET socket with PACKET_AUXDATA on) also each packet's tp_status."""

    def __init__(self, sock: socket.socket, batch: int = 64, slot: int = 65536,
                 auxdata: bool = False) -> None:
        self.fd = sock.fileno()
        self.batch = batch
        self.slot = slot
        self._data, self._iovs, self._msgs, _ = _messages(batch, slot, names=False)
        self._control = (ctypes.c_ubyte * (AUX_SPACE * batch if auxdata else 1))()
        if auxdata:
            base = ctypes.addressof(self._control)
            for i in range(batch):
                self._msgs[i].msg_hdr.msg_control = base + AUX_SPACE * i
                self._msgs[i].msg_hdr.msg_controllen = AUX_SPACE
        # Every packet's tp_status, as a strided view: one slice per batch.
        self._statuses = memoryview(self._control).cast("B").cast("I")[
            _AUX_STATUS_WORD::AUX_SPACE // 4] if auxdata else None
        self._view = memoryview(self._data).cast("B")
        self._msgs_view = memoryview(self._msgs).cast("B")
        # Every message's msg_len, as a strided view of 32-bit words: one slice per batch.
        self._lengths = self._msgs_view.cast("I")[_MSG_LEN_AT // 4:]
        self._msgs_ptr = ctypes.addressof(self._msgs)
        self.truncated = 0  # datagrams longer than a slot (cut short; the caller drops them)

    def receive(self) -> list[memoryview]:
        """The datagrams waiting now (at most a batch); [] when there are none.

        OSError for errors other than "nothing waiting"."""
        slot = self.slot
        view = self._view
        return [view[i * slot:i * slot + length] for i, length in enumerate(self._lengths_now())]

    def receive_bytes(self) -> list[bytes]:
        """``receive``, each datagram copied out as bytes: they outlive the next call, and a
        caller that slices them a lot gets bytes slices, cheaper than memoryview ones."""
        slot = self.slot
        view = self._view
        return [view[i * slot:i * slot + length].tobytes()
                for i, length in enumerate(self._lengths_now())]

    def receive_with_status(self) -> tuple[list[bytes], list[int]]:
        """``receive_bytes`` and each packet's tp_status (``auxdata`` receivers)."""
        statuses = self._statuses
        assert statuses is not None
        packets = self.receive_bytes()
        count = len(packets)
        if not count:
            return packets, []
        out = statuses[:count].tolist()
        msgs = self._msgs_view
        for i in range(count):  # the kernel wrote how much control it used: give it all again
            _SIZE.pack_into(msgs, i * _MMSG_SIZE + _MSG_CONTROLLEN_AT, AUX_SPACE)
        return packets, out

    def _lengths_now(self) -> list[int]:
        """recvmmsg: the lengths of the datagrams now in the slots."""
        count = _recvmmsg(self.fd, self._msgs_ptr, self.batch, MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return []
            raise OSError(code, errno.errorcode.get(code, str(code)))
        slot = self.slot
        lengths = self._lengths[:count * _MMSG_WORDS:_MMSG_WORDS].tolist()
        if slot < 65536:  # a datagram can be longer than a slot: MSG_TRUNC says it was cut
            msgs = self._msgs_view
            for i in range(count):
                if _INT.unpack_from(msgs, i * _MMSG_SIZE + _MSG_FLAGS_AT)[0] & _MSG_TRUNC:
                    self.truncated += 1
                    lengths[i] = min(lengths[i], slot)
        return lengths


class BatchSender:
    """Sends (payload, IPv4 destination) pairs with sendmmsg, a batch per call."""

    def __init__(self, sock: socket.socket, batch: int = 64, slot: int = 65536) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.slot = slot
        self._data, self._iovs, self._msgs, self._names = _messages(batch, slot, names=True)
        self._view = memoryview(self._data).cast("B")
        self._iovs_view = memoryview(self._iovs).cast("B")
        self._names_view = memoryview(self._names).cast("B")
        self._msgs_ptr = ctypes.addressof(self._msgs)
        self.last_errno = 0
        self.last_bytes = 0  # the payload bytes of the last ``send``'s packets

    def send(self, packets: list[tuple[bytes, bytes]]) -> int:
        """Send every packet (to port 0 of its IPv4 address); the number the kernel refused
        (each refusal is one packet, never retried: RFC 1812 §5.3.6 lets routers drop)."""
        failed = total = 0
        view, iovs, names, slot = self._view, self._iovs_view, self._names_view, self.slot
        for first in range(0, len(packets), self.batch):
            chunk = packets[first:first + self.batch]
            for i, (payload, dst) in enumerate(chunk):
                start = i * slot
                length = len(payload)  # at most 65535: an IPv4 datagram fits a slot
                total += length
                view[start:start + length] = payload
                _SIZE.pack_into(iovs, i * _IOV_SIZE + _IOV_LEN_AT, length)
                _SOCKADDR_IN.pack_into(names, 16 * i, socket.AF_INET, b"\0\0", dst)
            done = 0
            while done < len(chunk):
                sent = _sendmmsg(self.fd, self._msgs_ptr + done * _MMSG_SIZE,
                                 len(chunk) - done, 0)
                if sent < 0:
                    code = ctypes.get_errno()
                    if code == errno.EINTR:
                        continue
                    # The first unsent packet failed; skip it and go on with the rest.
                    self.last_errno = code
                    failed += 1
                    done += 1
                else:
                    done += sent
        self.last_bytes = total
        return failed
