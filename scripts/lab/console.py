"""The lab's console driver: one emulated Xen host (QEMU under TCG) and its
serial console, driven as a person would type (see docs/lab.md, "The console
driver"). Python 3 standard library only."""
import os
import re
import signal
import socket
import subprocess
import threading
import time

CACHE = os.environ.get("XENMIG_LAB_CACHE", "/var/tmp/xenmig-lab")
T0 = time.monotonic()
# multi-threaded TCG is faster for one host; see docs/lab.md for the hangs seen with it
# -smap: a PV dom0 crashes at once with emulated SMAP (notes). -xsave,-avx,-avx2:
# see docs/lab.md (random segfaults/hangs of dom0 programs once a guest runs)
CPU = os.environ.get("XENMIG_LAB_CPU", "max,-smap,-smep,-xsave,-avx,-avx2")
TCG_THREAD = os.environ.get("XENMIG_LAB_TCG_THREAD", "single")


def log(msg):
    print(f"[lab {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class LabError(Exception):
    pass


class Host:
    """One emulated Xen host: a QEMU process and a serial console driver."""

    XEN_ARGS = ("console=com1 com1=115200,8n1 dom0_mem={mem}M,max:{mem}M "
                "dom0_max_vcpus=2 noreboot")
    DOM0_ARGS = ("root=/dev/vda rw console=hvc0 earlyprintk=xen net.ifnames=0 "
                 "quiet xenmig_ip={ip} xenmig_host={name}")

    def __init__(self, idx, image, payload, rundir, net, mem=2048, dom0_mem=1024,
                 lvm_size="1G"):
        self.idx = idx
        self.name = f"xenlab{idx}"
        self.ip = f"10.99.0.{idx}"
        self.image, self.payload, self.rundir = image, payload, rundir
        self.net = net  # ("listen"|"connect", port) or None
        self.mem, self.dom0_mem, self.lvm_size = mem, dom0_mem, lvm_size
        self.sock_path = os.path.join(rundir, f"{self.name}.sock")
        self.serial_log = os.path.join(rundir, f"{self.name}-serial.log")
        self.qemu_log = os.path.join(rundir, f"{self.name}-qemu.log")
        self.proc = None
        self.sock = None
        self.buf = ""
        self.lock = threading.Lock()
        self.seq = 0
        self.boot_start = None

    # ---- QEMU ----
    def start(self):
        overlay = os.path.join(self.rundir, f"{self.name}-root.qcow2")
        lvm = os.path.join(self.rundir, f"{self.name}-pv.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        os.path.join(self.image, "dom0.qcow2"), overlay], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", lvm, self.lvm_size], check=True)
        dom0_args = self.DOM0_ARGS.format(ip=self.ip, name=self.name)
        cmd = [
            "qemu-system-x86_64", "-name", self.name,
            "-machine", "pc", "-nodefaults", "-display", "none",
            "-accel", f"tcg,thread={TCG_THREAD},tb-size=1024",
            "-cpu", CPU, "-smp", "2", "-m", str(self.mem),
            "-kernel", os.path.join(self.image, "xen"),
            "-append", self.XEN_ARGS.format(mem=self.dom0_mem),
            "-initrd", f"{os.path.join(self.image, 'vmlinuz')} {dom0_args},"
                       f"{os.path.join(self.image, 'initrd')}",
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={lvm},if=virtio,format=raw,cache=unsafe",
            "-drive", f"file={self.payload},if=virtio,format=raw,readonly=on",
            "-chardev", f"socket,id=con,path={self.sock_path},server=on,wait=off,"
                        f"logfile={self.serial_log}",
            "-serial", "chardev:con",
        ]
        if self.net:
            mode, port = self.net
            cmd += ["-netdev", f"socket,id=n0,{mode}=127.0.0.1:{port}",
                    "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:99:00:0{self.idx}"]
        with open(os.path.join(self.rundir, f"{self.name}-qemu.cmd"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        self.boot_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=open(self.qemu_log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        for _ in range(100):
            if self.proc.poll() is not None:
                raise LabError(f"{self.name}: QEMU exited at once; see {self.qemu_log}:\n"
                               + open(self.qemu_log).read()[-2000:])
            if os.path.exists(self.sock_path):
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(self.sock_path)
                    self.sock = s
                    break
                except OSError:
                    s.close()
            time.sleep(0.1)
        else:
            raise LabError(f"{self.name}: no serial socket {self.sock_path}")
        threading.Thread(target=self._reader, daemon=True).start()
        log(f"{self.name}: QEMU pid {self.proc.pid}, serial log {self.serial_log}")

    def _reader(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.buf += data.decode("utf-8", "replace").replace("\r", "")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except Exception:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
                except Exception:
                    pass
        if self.sock:
            self.sock.close()

    # ---- console ----
    def send(self, text):
        """Xen's serial input ring drops characters fed fast: 16 bytes per 50 ms."""
        data = text.encode()
        for i in range(0, len(data), 16):
            self.sock.sendall(data[i:i + 16])
            time.sleep(0.05)

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise LabError(f"{self.name}: QEMU exited (status {self.proc.returncode}); "
                           f"serial log {self.serial_log}, QEMU log {self.qemu_log}")
        with self.lock:
            tail = self.buf[-4000:]
        for bad in ("Hardware Dom0 crashed", "Kernel panic", "FATAL TRAP", "Panic on CPU"):
            if bad in tail:
                raise LabError(f"{self.name}: '{bad}' on the console; serial log {self.serial_log}")

    def wait_for(self, pattern, timeout, start=0):
        """Wait until regex `pattern` appears in the console output after offset `start`."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                m = rx.search(self.buf, start)
            if m:
                return m
            self._check_alive()
            time.sleep(0.2)
        raise LabError(f"{self.name}: timeout ({timeout}s) waiting for /{pattern}/; "
                       f"serial log {self.serial_log}")

    def wait_shell(self, timeout=300):
        """Wait for the autologin root shell on hvc0, then make the console script-friendly."""
        end = time.monotonic() + timeout
        self.wait_for(r"root@\S*:~# |(automatic login)", timeout)
        while True:
            mark = len(self.buf)
            self.send("\n")
            try:
                self.wait_for(r"# ", 5, mark)
                break
            except LabError:
                if time.monotonic() > end:
                    raise
        # no readline (its echo wraps and redraws); the tty's own echo is verbatim
        self.send("stty -onlcr cols 2000; exec bash --noediting\n")
        time.sleep(2)
        self.send("export PS1='> ' PS2='' TERM=dumb PAGER=cat SYSTEMD_PAGER=cat\n")
        time.sleep(2)
        rc, out = self.run("dmesg -n 1; uname -r", 60)
        # the payload disk (xenmig, the guest) normally mounts from fstab; under
        # load udev may be late with the label link, so make sure
        self.sh("mountpoint -q /opt/xenmig || mount -o ro /dev/vdc /opt/xenmig; "
                "test -x /opt/xenmig/xenmig", 60)
        booted = time.monotonic() - self.boot_start
        log(f"{self.name}: dom0 shell after {booted:.0f} s (kernel {out.strip()})")
        return booted

    def run(self, cmd, timeout=120, check=False):
        """Run a shell command in dom0; return (status, output).

        The line is typed without its newline, and Enter is pressed only once
        the terminal has echoed it back intact: Xen's serial input ring drops
        characters when dom0 is busy, and a dropped quote would hang the shell.
        """
        self.seq += 1
        n = self.seq
        # the markers are split by "" so that the echoed command line never matches
        line = f'echo __XB""{n}__; {{ {cmd} ; }} </dev/null 2>&1; echo __XE""{n}_$?__'
        for attempt in range(1, 5):
            with self.lock:
                mark = len(self.buf)
            self.send(line)
            try:
                self.wait_for(re.escape(line), 10 + len(line) / 50, mark)
                break
            except LabError:
                log(f"{self.name}: console: line not echoed intact (attempt {attempt}), "
                    f"retyping")
                self.sock.sendall(b"\x03")
                time.sleep(2)
        else:
            raise LabError(f"{self.name}: console: cannot type a command intact; "
                           f"serial log {self.serial_log}")
        self.send("\n")
        try:
            m_end = self.wait_for(rf"__XE{n}_(\d+)__", timeout, mark)
        except LabError:
            self.sock.sendall(b"\x03")
            raise LabError(f"{self.name}: command timed out after {timeout}s: {cmd}\n"
                           f"serial log {self.serial_log}")
        with self.lock:
            text = self.buf[mark:m_end.start()]
        m_beg = re.search(rf"(?m)^__XB{n}__\n", text)
        out = text[m_beg.end():] if m_beg else text
        rc = int(m_end.group(1))
        if check and rc != 0:
            raise LabError(f"{self.name}: `{cmd}` failed with status {rc}:\n{out}")
        return rc, out

    def sh(self, cmd, timeout=120):
        return self.run(cmd, timeout, check=True)[1]
