#!/usr/bin/env python3
"""Run one command as root inside a throw-away qemu guest that boots Debian's own kernel.

    tools/vmrun.py [--timeout S] [--modules "sit veth tun"] [--prepare] -- COMMAND ARGS...

Why: sixgate's kernel backend makes real ``sit`` tunnels, and the kernels we develop and run CI
on may have no ``sit`` driver at all. The guest runs the stock Debian 12 kernel
(``linux-image-amd64``), so the test sees exactly what a Debian server sees.

How:

- The cache (``$SIXGATE_VM_CACHE``, default ``~/.cache/sixgate-vm``) holds the kernel package
  unpacked with ``dpkg-deb -x`` (never installed: that would pull initramfs-tools and udev),
  its ``modules.dep`` from ``depmod -b``, the ELF ``vmlinux`` unpacked from the xz bzImage
  (booted through its PVH entry: ~3.5 s faster per boot under TCG), and a small initramfs
  (static busybox, the modules 9p/overlay/virtio-console need, the two init stages below).
- Stage 1 mounts the host's ``/`` read-only over 9p under a tmpfs overlay: the guest sees the
  host's files and interpreters at the same paths, may write anywhere, and nothing it writes
  reaches the host. Stage 2 runs the job: the caller's exported environment, cwd and argv.
- The command's stdout/stderr leave through two virtio-serial ports to pipes this script
  forwards live; its exit code leaves through a third port. Then the guest powers off.

Safety: the guest has NO network device (``-nodefaults`` and no ``-net``/``-nic``); traffic
stays in the guest's own namespaces. The host's files are exported read-only.

Exit status: the command's, or 124 on timeout, or 125 if the guest never reported a status
(the tail of the guest console is printed), or 3 if the VM could not be prepared or started.

KVM is used only where it can work: /dev/kvm writable, ``kvm_intel``/``kvm_amd`` loaded and not
``kvm_pvm`` (a PVM host cannot boot a Debian kernel). Otherwise TCG; ``SIXGATE_VM_ACCEL=tcg`` or
``=kvm`` forces one. Only TCG has been exercised on our machines.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125
EXIT_SETUP = 3

KERNEL_METAPACKAGE = "linux-image-amd64"
DEFAULT_CACHE = Path.home() / ".cache" / "sixgate-vm"
DEFAULT_MODULES = "sit veth tun"  # tun: the userspace backend against a sit peer
DEFAULT_TIMEOUT_S = 600.0
QEMU = "qemu-system-x86_64"
# 512 MiB is plenty: qemu's resident size stays ~300-450 MB with -m 512 or -m 1024 alike, as what
# grows is the TCG translation cache and the guest pages actually touched.
GUEST_MEMORY_MB = 512
GUEST_CPUS = 2
# What stage 1 needs before the host's root is mounted; dependencies come from modules.dep.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console")
# The kernel clamps larger values to what its virtqueue allows; bigger reads mean fewer 9p
# round trips when the guest reads files (Python start-up is dominated by emulated CPU).
NINEP_MSIZE = 512 * 1024
GUEST_TOOLS_DIR = "/run/sixgate-vm/bin"  # busybox + links, on a guest-only tmpfs
CONSOLE_TAIL_LINES = 40
PORT_STDOUT = "sixgate.stdout"
PORT_STDERR = "sixgate.stderr"
PORT_STATUS = "sixgate.status"

# Stage 1, /init of the initramfs (busybox sh). @MODULES@ is the load order of INITRAMFS_MODULES.
STAGE1 = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "sixgate-vm stage 1: $*" >/dev/console; poweroff -f; }
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev \
    || fail "cannot mount proc/sys/dev"
for module in @MODULES@; do
    insmod "/modules/$module.ko" || fail "insmod $module"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=@MSIZE@ hostroot /lower \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 rw /rw && mkdir /rw/upper /rw/work || fail "cannot mount tmpfs"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay"
mkdir -p /newroot/lib/modules && mount --bind "/newroot$sixgate_modules" /newroot/lib/modules \
    || fail "cannot bind the kernel's modules from $sixgate_modules"
mount -t tmpfs -o mode=0755 run /newroot/run || fail "cannot mount /run"
mkdir -p /newroot@TOOLS@
cp /bin/busybox /stage2 /newroot@TOOLS@/ || fail "cannot copy busybox"
for tool in sh env modprobe insmod rmmod lsmod depmod poweroff; do
    ln -s busybox "/newroot@TOOLS@/$tool"
done
for fs in proc sys dev; do
    mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs"
done
exec switch_root /newroot @TOOLS@/sh @TOOLS@/stage2
"""

# Stage 2 (busybox sh, in the switched root): devices, modprobe, ports, then the job.
STAGE2 = r"""
tools=@TOOLS@
fail() { echo "sixgate-vm stage 2: $*" >/dev/console; "$tools/poweroff" -f; }
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts && ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
ln -sf /proc/self/fd /dev/fd
for fd in 0:stdin 1:stdout 2:stderr; do ln -sf "fd/${fd%:*}" "/dev/${fd#*:}"; done
echo "$tools/modprobe" >/proc/sys/kernel/modprobe
"$tools/busybox" hostname sixgate-vm
"$tools/busybox" ip link set lo up
port() {
    # No udev here, so no /dev/virtio-ports/NAME links: look the name up in sysfs.
    for attempt in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        for dir in /sys/class/virtio-ports/*; do
            if [ "$(cat "$dir/name" 2>/dev/null)" = "$1" ]; then echo "/dev/${dir##*/}"; return; fi
        done
        "$tools/busybox" sleep 0.1
    done
    fail "no virtio port named $1"
}
out=$(port @STDOUT@); err=$(port @STDERR@); status=$(port @STATUS@)
"$tools/env" -i "$tools/sh" "$sixgate_job" </dev/null >"$out" 2>"$err"
echo "$?" >"$status"
"$tools/poweroff" -f
"""


class SetupError(Exception):
    """The VM cannot be prepared or started here (the message says what is missing)."""


# ----------------------------------------------------------------------------------------------
# The cache: kernel, vmlinux, initramfs


def cache_dir() -> Path:
    return Path(os.environ.get("SIXGATE_VM_CACHE") or DEFAULT_CACHE).expanduser().resolve()


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Serialise preparation: two first runs at once must not extract into the same place."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def resolve_kernel_version() -> str:
    """The ABI name (``6.1.0-NN-amd64``) Debian's kernel metapackage currently depends on."""
    if shutil.which("apt-cache") is None:
        raise SetupError("apt-cache is not installed: cannot find Debian's kernel package")
    result = subprocess.run(["apt-cache", "depends", KERNEL_METAPACKAGE],
                            capture_output=True, text=True, check=False)
    match = re.search(r"Depends:\s+linux-image-(\S+-amd64)\b", result.stdout)
    if result.returncode != 0 or match is None:
        raise SetupError(f"`apt-cache depends {KERNEL_METAPACKAGE}` names no kernel "
                         f"(run apt-get update?): {result.stderr.strip()}")
    return match.group(1)


def kernel_root(cache: Path, version: str) -> Path:
    return cache / version / "kroot"


def modules_dir(cache: Path, version: str) -> Path:
    return kernel_root(cache, version) / "lib" / "modules" / version


def kernel_is_unpacked(cache: Path, version: str) -> bool:
    return (modules_dir(cache, version) / "modules.dep").is_file()


def unpack_kernel(cache: Path, version: str) -> None:
    """apt-get download + dpkg-deb -x + depmod -b, into a temporary dir renamed at the end."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} is not installed: cannot fetch the Debian kernel")
    version_dir = cache / version
    version_dir.mkdir(parents=True, exist_ok=True)
    for stale in version_dir.glob("unpack.*"):  # a run killed mid-way (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=version_dir, prefix="unpack.") as scratch:
        package = f"linux-image-{version}"
        _checked(["apt-get", "download", "-q", package], cwd=scratch,
                 what=f"apt-get download {package}")
        (deb,) = Path(scratch).glob("*.deb")
        kroot = Path(scratch) / "kroot"
        _checked(["dpkg-deb", "-x", str(deb), str(kroot)], what="dpkg-deb -x")
        deb.unlink()
        # kmod's depmod also writes the modules.*.bin its modprobe needs; busybox's writes the
        # text files its own modprobe reads (the guest uses busybox's modprobe either way).
        depmod = ["depmod"] if shutil.which("depmod") else ["busybox", "depmod"]
        _checked([*depmod, "-b", str(kroot), version], what="depmod -b")
        target = kernel_root(cache, version)
        if target.exists():
            shutil.rmtree(target)
        kroot.rename(target)


def _checked(command: Sequence[str], what: str, cwd: str | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SetupError(f"{what} failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-2000:]}")


def bzimage_path(cache: Path, version: str) -> Path:
    return kernel_root(cache, version) / "boot" / f"vmlinuz-{version}"


def unpack_vmlinux(bzimage: Path, target: Path) -> None:
    """The ELF vmlinux inside Debian's xz-compressed bzImage, if it has a PVH entry point."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise SetupError(f"{bzimage} holds no xz stream")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    if not has_pvh_entry(elf):
        raise SetupError(f"the vmlinux in {bzimage} has no PVH entry note")
    partial = target.with_suffix(".partial")
    partial.write_bytes(elf)
    partial.rename(target)


def has_pvh_entry(elf: bytes) -> bool:
    """True when a PT_NOTE holds the Xen note XEN_ELFNOTE_PHYS32_ENTRY (18), qemu's PVH entry."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # 64-bit only
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        position, end = p_offset, p_offset + p_filesz
        while position + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, position)
            name = elf[position + 12:position + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == 18:
                return True
            position += 12 + _align4(namesz) + _align4(descsz)
    return False


def _align4(size: int) -> int:
    return (size + 3) & ~3


def busybox_path() -> Path:
    """The static busybox (package busybox-static), or SetupError saying what is wrong."""
    found = shutil.which("busybox") or "/bin/busybox"
    path = Path(found).resolve()
    if not path.is_file():
        raise SetupError("busybox is not installed (apt-get install busybox-static)")
    if not is_static_elf(path.read_bytes()):
        raise SetupError(f"{path} is dynamically linked: the initramfs needs busybox-static")
    return path


def is_static_elf(elf: bytes) -> bool:
    """No PT_INTERP program header: the binary runs without a dynamic loader."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return all(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def module_load_order(modules: Path, wanted: Sequence[str]) -> list[str]:
    """Relative paths of ``wanted`` and everything they depend on, dependencies first."""
    depends: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        module, _, deps = line.partition(":")
        depends[module] = deps.split()
        by_name[Path(module).name.removesuffix(".ko").replace("-", "_")] = module
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        for dep in depends[module]:
            visit(dep)
        order.append(module)

    for name in wanted:
        if name not in by_name:
            raise SetupError(f"module {name} is not in {modules}/modules.dep")
        visit(by_name[name])
    return order


def initramfs_content(cache: Path, version: str, busybox: Path) -> tuple[list[str], str]:
    """Module load order and a key that changes whenever the initramfs would differ."""
    order = module_load_order(modules_dir(cache, version), INITRAMFS_MODULES)
    key = hashlib.sha256()
    for part in (STAGE1, STAGE2, str(NINEP_MSIZE), GUEST_TOOLS_DIR, *order):
        key.update(part.encode() + b"\0")
    key.update(busybox.read_bytes())
    return order, key.hexdigest()


def build_initramfs(cache: Path, version: str, busybox: Path, order: list[str], key: str) -> None:
    names = [Path(module).name.removesuffix(".ko") for module in order]
    stage1 = (STAGE1.replace("@MODULES@", " ".join(names))
              .replace("@MSIZE@", str(NINEP_MSIZE)).replace("@TOOLS@", GUEST_TOOLS_DIR))
    stage2 = (STAGE2.replace("@TOOLS@", GUEST_TOOLS_DIR).replace("@STDOUT@", PORT_STDOUT)
              .replace("@STDERR@", PORT_STDERR).replace("@STATUS@", PORT_STATUS))
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules"):
        archive.directory(directory)
    archive.device("dev/console", major=5, minor=1)
    archive.file("bin/busybox", busybox.read_bytes(), mode=0o755)
    archive.file("init", stage1.encode(), mode=0o755)
    archive.file("stage2", stage2.encode(), mode=0o644)
    for module, name in zip(order, names, strict=True):
        archive.file(f"modules/{name}.ko", (modules_dir(cache, version) / module).read_bytes())
    target = cache / version / "initramfs.cpio"
    partial = target.with_suffix(".partial")
    partial.write_bytes(archive.finish())
    partial.rename(target)
    (cache / version / "initramfs.key").write_text(key + "\n")


class Cpio:
    """A tiny writer of the "newc" cpio format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.inode = 0

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)
               ) -> None:
        self.inode += 1
        fields = (self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        self.data += b"070701" + b"".join(b"%08X" % field for field in fields)
        self.data += name.encode() + b"\0"
        self._pad()
        self.data += body
        self._pad()

    def _pad(self) -> None:
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, body)

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def prepare(cache: Path, refresh: bool) -> str:
    """Make the cache complete; returns the kernel version to boot. Idempotent.

    ``refresh`` asks apt which kernel is current (``--prepare``); otherwise the kernel of the
    last preparation is reused as long as it is complete, so runs need neither apt nor network.
    """
    busybox = busybox_path()
    with cache_lock(cache):
        recorded = cache / "kernel"
        version = recorded.read_text().strip() if recorded.is_file() else ""
        usable = bool(version) and kernel_is_unpacked(cache, version)
        if refresh or not usable:
            try:
                version = resolve_kernel_version()
            except SetupError as error:
                if not usable:
                    raise
                say(f"keeping kernel {version}: {error}")
        if not kernel_is_unpacked(cache, version):
            say(f"preparing the guest kernel {version} in {cache}")
            unpack_kernel(cache, version)
        vmlinux = cache / version / "vmlinux"
        if not vmlinux.is_file():
            try:
                unpack_vmlinux(bzimage_path(cache, version), vmlinux)
            except (SetupError, lzma.LZMAError) as error:
                say(f"booting the bzImage, ~3.5 s slower: {error}")
        order, key = initramfs_content(cache, version, busybox)
        key_file = cache / version / "initramfs.key"
        if not key_file.is_file() or key_file.read_text().strip() != key:
            build_initramfs(cache, version, busybox, order, key)
        if version_in(recorded) != version:
            partial = recorded.with_suffix(".partial")
            partial.write_text(version + "\n")
            partial.rename(recorded)
    return version


def version_in(recorded: Path) -> str:
    return recorded.read_text().strip() if recorded.is_file() else ""


# ----------------------------------------------------------------------------------------------
# One run


def job_script(argv: Sequence[str], cwd: str, environ: dict[str, str], modules: Sequence[str]
               ) -> str:
    """The guest's job: load modules, then the caller's environment, cwd and command."""
    lines = ["# written by tools/vmrun.py; runs under busybox sh in the guest"]
    for module in modules:
        lines.append(f"{GUEST_TOOLS_DIR}/modprobe {shlex.quote(module)} || "
                     f"echo {shlex.quote(f'vmrun: cannot load module {module}')} >&2")
    environ = dict(environ, SIXGATE_IN_VM="1")
    # Root's tools (ip, modprobe) must be found even when the caller is not root.
    path = [part for part in environ.get("PATH", "/usr/bin:/bin").split(":") if part]
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin", GUEST_TOOLS_DIR):
        if extra not in path:
            path.append(extra)
    environ["PATH"] = ":".join(path)
    for name, value in sorted(environ.items()):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in ("PWD", "OLDPWD"):
            lines.append(f"export {name}={shlex.quote(value)}")
    message = shlex.quote(f"vmrun: cannot enter {cwd} in the guest")
    lines.append(f"cd -- {shlex.quote(cwd)} || {{ echo {message} >&2; exit 126; }}")
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in argv))
    return "\n".join(lines) + "\n"


def accelerator() -> list[str]:
    forced = os.environ.get("SIXGATE_VM_ACCEL", "")
    modules = Path("/sys/module")
    kvm_usable = (os.access("/dev/kvm", os.R_OK | os.W_OK)
                  and ((modules / "kvm_intel").exists() or (modules / "kvm_amd").exists())
                  and not (modules / "kvm_pvm").exists())
    if forced == "kvm" or (forced != "tcg" and kvm_usable):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_binary() -> str:
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise SetupError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return qemu


def qemu_command(cache: Path, version: str, job: Path, stdout_fd: int, stderr_fd: int
                 ) -> list[str]:
    qemu = qemu_binary()
    modules = str(kernel_root(cache, version) / "lib" / "modules")
    for value in (modules, str(job)):
        if re.search(r"\s", value):
            raise SetupError(f"{value!r} contains white space, which the kernel command line "
                             "cannot carry")
    vmlinux = cache / version / "vmlinux"
    append = ["console=ttyS0", "panic=-1", "quiet", "rdinit=/init",
              f"sixgate_modules={modules}", f"sixgate_job={job / 'job.sh'}"]

    def port(name: str, chardev: str) -> list[str]:
        return ["-chardev", chardev, "-device", f"virtserialport,bus=ports.0,chardev={name},"
                f"name={name}"]

    return [
        qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "pc", *accelerator(), "-smp", str(GUEST_CPUS), "-m", str(GUEST_MEMORY_MB),
        "-kernel", str(vmlinux if vmlinux.is_file() else bzimage_path(cache, version)),
        "-initrd", str(cache / version / "initramfs.cpio"), "-append", " ".join(append),
        "-chardev", f"file,id=console,path={job / 'console.log'}", "-serial", "chardev:console",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-device", "virtio-serial-pci,id=ports",
        # qemu opens /proc/self/fd/N, i.e. our pipe: output streams, and a caller's regular
        # file is never written by two processes at different offsets.
        *port(PORT_STDOUT, f"file,id={PORT_STDOUT},path=/proc/self/fd/{stdout_fd}"),
        *port(PORT_STDERR, f"file,id={PORT_STDERR},path=/proc/self/fd/{stderr_fd}"),
        *port(PORT_STATUS, f"file,id={PORT_STATUS},path={job / 'status'}"),
    ]


class Interrupted(Exception):
    pass


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def run(argv: Sequence[str], timeout_s: float, modules: Sequence[str], verbose: bool) -> int:
    cache = cache_dir()
    version = prepare(cache, refresh=False)
    job = Path(tempfile.mkdtemp(prefix="sixgate-vm."))
    try:
        (job / "job.sh").write_text(job_script(argv, os.getcwd(), dict(os.environ), modules))
        return boot(cache, version, job, timeout_s, verbose)
    finally:
        shutil.rmtree(job, ignore_errors=True)


def boot(cache: Path, version: str, job: Path, timeout_s: float, verbose: bool) -> int:
    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    command = qemu_command(cache, version, job, stdout_write, stderr_write)
    if verbose:
        say("qemu command: " + shlex.join(command))
    started = time.monotonic()
    qemu_log = open(job / "qemu.log", "wb")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=qemu_log,
                               stderr=subprocess.STDOUT, pass_fds=(stdout_write, stderr_write),
                               start_new_session=True)
    os.close(stdout_write)
    os.close(stderr_write)
    timed_out = False
    try:
        timed_out = not forward({stdout_read: 1, stderr_read: 2}, started + timeout_s)
    except (KeyboardInterrupt, Interrupted):
        process.kill()
        raise
    finally:
        if timed_out:
            process.kill()
        _, wait_status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(wait_status)
        qemu_log.close()
        os.close(stdout_read)
        os.close(stderr_read)
    if verbose:
        say(f"guest ran {time.monotonic() - started:.1f} s, qemu exit {process.returncode}, "
            f"qemu max RSS {usage.ru_maxrss // 1024} MB")
    if timed_out:
        say(f"timeout: the guest was still running after {timeout_s:g} s; killed it")
        print_tail(job)
        return EXIT_TIMEOUT
    status = (job / "status").read_text().strip() if (job / "status").is_file() else ""
    if not status.isdigit():
        say(f"the guest reported no exit status (qemu exit {process.returncode})")
        print_tail(job)
        return EXIT_NO_STATUS
    return int(status)


def forward(pipes: dict[int, int], deadline: float) -> bool:
    """Copy each pipe to its fd until all reach EOF (qemu exited); False at the deadline."""
    selector = selectors.DefaultSelector()
    for source in pipes:
        selector.register(source, selectors.EVENT_READ)
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for key, _ in selector.select(remaining):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
                continue
            with contextlib.suppress(BrokenPipeError):
                _write_all(pipes[key.fd], chunk)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def print_tail(job: Path) -> None:
    for name in ("console.log", "qemu.log"):
        path = job / name
        text = path.read_text(errors="replace") if path.is_file() else ""
        lines = text.splitlines()[-CONSOLE_TAIL_LINES:]
        say(f"----- tail of the guest's {name} -----" if lines else f"({name} is empty)")
        for line in lines:
            print(line, file=sys.stderr)


def say(message: str) -> None:
    print(f"vmrun: {message}", file=sys.stderr, flush=True)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run COMMAND as root in a qemu guest booted with Debian's kernel.",
        epilog="Exit status: COMMAND's, 124 timeout, 125 no status from the guest, "
               "3 VM cannot be prepared or started.")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"kill the guest after S seconds (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--modules", default=DEFAULT_MODULES,
                        help=f'modules to load before COMMAND (default "{DEFAULT_MODULES}"; '
                             '"" loads none, kernel auto-loading still works)')
    parser.add_argument("--prepare", action="store_true",
                        help="only prepare the cache (kernel, vmlinux, initramfs) and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="print the qemu command, run time and qemu's memory")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    options = parser.parse_args(args)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    # SIGTERM/SIGHUP unwind like Ctrl-C: qemu is killed, temporary files are removed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        if options.prepare:
            if command:
                parser.error("--prepare takes no command")
            version = prepare(cache_dir(), refresh=True)
            qemu_binary()  # ready to run means qemu too, so a caller can skip on exit 3
            say(f"cache ready: {cache_dir() / version}")
            return 0
        if not command:
            parser.error("no command given (vmrun.py -- COMMAND ARGS...)")
        return run(command, options.timeout, options.modules.split(), options.verbose)
    except SetupError as error:
        say(f"cannot run the VM: {error}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    except Interrupted as signum:
        return 128 + int(signum.args[0])


if __name__ == "__main__":
    sys.exit(main())
