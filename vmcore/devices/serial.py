"""A 16550A UART at an I/O port base: enough for Linux's 8250 driver and its console.

Guest output is kept in a bounded buffer (and passed to an optional sink); there is no guest
input. The interrupt line is pulsed through KVM_IRQ_LINE when an enabled condition becomes true.
"""

from __future__ import annotations

from typing import Any, Callable

REGISTERS = 8
_IER_RDA, _IER_THRE = 0x01, 0x02
_IIR_NONE, _IIR_THRE, _IIR_FIFO = 0x01, 0x02, 0xC0
_LCR_DLAB = 0x80
_LSR_THRE_TEMT = 0x60
_MCR_LOOP = 0x10
_MSR_LOOP_MASK = 0xF0
OUTPUT_LIMIT = 1 << 20


class Serial:
    def __init__(self, raise_irq: Callable[[], None], sink: Callable[[bytes], None] | None = None):
        self._raise_irq = raise_irq
        self._sink = sink
        self.output = bytearray()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0
        self.fcr = 0
        self.thre_pending = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self._read(offset)]) + b"\x00" * (size - 1)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & _LCR_DLAB
        if offset == 0:
            return self.dll if dlab else 0
        if offset == 1:
            return self.dlm if dlab else self.ier
        if offset == 2:
            fifo = _IIR_FIFO if self.fcr & 1 else 0
            if self.thre_pending and self.ier & _IER_THRE:
                self.thre_pending = False  # reading IIR clears a THRE interrupt
                return _IIR_THRE | fifo
            return _IIR_NONE | fifo
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            return _LSR_THRE_TEMT
        if offset == 6:
            # In loopback the modem inputs mirror the outputs; the 8250 probe checks this.
            if self.mcr & _MCR_LOOP:
                return ((self.mcr & 0x0C) << 4) | ((self.mcr & 0x01) << 5) | ((self.mcr & 0x02) << 3)
            return 0xB0  # DCD, DSR, CTS asserted
        return self.scr

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        dlab = self.lcr & _LCR_DLAB
        if offset == 0:
            if dlab:
                self.dll = value
            elif not self.mcr & _MCR_LOOP:
                self._emit(bytes([value]))
                self._thre()
        elif offset == 1:
            if dlab:
                self.dlm = value
            else:
                enabling = value & _IER_THRE and not self.ier & _IER_THRE
                self.ier = value & 0x0F
                if enabling:
                    self._thre()
        elif offset == 2:
            self.fcr = value
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
        elif offset == 7:
            self.scr = value

    def _thre(self) -> None:
        self.thre_pending = True
        if self.ier & _IER_THRE:
            self._raise_irq()

    def _emit(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > OUTPUT_LIMIT:
            del self.output[: len(self.output) - OUTPUT_LIMIT]
        if self._sink is not None:
            self._sink(data)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


def build(machine: Any, spec: Any, **host: Any) -> Serial:
    """Registry factory: config {"port": base, "irq": line}."""
    irq = int(spec.config.get("irq", 4))
    base = int(spec.config.get("port", 0x3F8))

    def pulse() -> None:
        if machine.vm.fd >= 0:
            machine.vm.irq_line(irq, 1)
            machine.vm.irq_line(irq, 0)

    serial = Serial(pulse, host.get("serial_sink"))
    machine.pio.register(base, REGISTERS, serial)
    return serial
